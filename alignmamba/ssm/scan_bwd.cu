// Backward of the selective scan, CUDA C++ compiled at run time by NVRTC (no build step;
// alignmamba/ssm/nvrtc.py). Design and measurements: docs/KERNEL_NOTES.md, v9.
//
// Same mathematics as the Triton backward (_ssm_bwd_kernel in triton_scan.py). With
// s_t = dL/dh_t, g_t = dL/dy_t (after the gate) and dA_t = exp(delta_t A):
//   s_t     = C_t g_t + dA_{t+1} s_{t+1}           (reverse; seeded past the segment's end)
//   e_t     = h_t - delta_t B_t u_t  (= dA_t h_{t-1})
//   dA     += delta_t s_t e_t;   ddelta_t = sum_n (A s_t e_t + s_t B_t u_t)
//   du_t    = delta_t sum_n s_t B_t + D g_t;   dB_t = sum_d s_t delta_t u_t;  dC_t = sum_d g_t h_t
//
// Layout: a block is NT = 256 threads = CH = 128 channels of one group, two threads per channel
// (lanes l and l ^ 16 of a warp hold states 0-7 and 8-15: NP = 16 states, N <= 16 zero-padded).
// Per checkpoint segment (SEG = 64 steps, walked from the end):
//   * B and C rows of the segment are staged once in shared memory (every thread reads the
//     same row at the same step: a broadcast);
//   * pass A re-runs the forward from the saved state and keeps the state at the start of each
//     TS = 8 step sub-chunk in shared memory;
//   * per sub-chunk, from the last: pass B re-runs its 8 steps (states to shared memory,
//     exp(delta A) in registers, gate), then the adjoint walks them backwards.
// The channel sums dB, dC: each thread has 16 values per step (8 states x {dB, dC}); a warp
// transpose-reduce over the 16 lanes of a half (xor 8, 4, 2, 1; 60 instructions) leaves one
// (kind, state) sum per lane; warps' sums go through shared memory and are added to global
// memory with one fp32 atomic per (kind, state, step) per block.

#include "scan_common.cuh"

#ifndef CH
#define CH 128  // channels per block (the launcher passes -DCH=...)
#endif
#define NT (2 * CH)
#define HALF 8
#define NP 16
#define KS 8
#define SEG 64

// One level of the transpose-reduce: lanes l and l ^ W exchange halves of v[0, 2W): the lane
// with bit W set keeps v[W, 2W), the other v[0, W); each adds its partner's copy. W is a
// template constant so that every index is static (no dynamic register indexing).
template <int W>
__device__ __forceinline__ void xreduce_level(float (&v)[16], bool up) {
#pragma unroll
    for (int i = 0; i < W; ++i) {
        const float send = up ? v[i] : v[i + W];
        const float keep = up ? v[i + W] : v[i];
        v[i] = keep + __shfl_xor_sync(FULL, send, W);
    }
}

// Sum v[i] over the 16 lanes of this half-warp for all 16 i at once (15 shuffles instead of
// 16 x 4). Afterwards the lane with (lane & 15) == i holds the sum of v[i].
__device__ __forceinline__ float transpose_reduce16(float (&v)[16], int lane) {
    xreduce_level<8>(v, (lane & 8) != 0);
    xreduce_level<4>(v, (lane & 4) != 0);
    xreduce_level<2>(v, (lane & 2) != 0);
    xreduce_level<1>(v, (lane & 1) != 0);
    return v[0];
}

template <int DT, bool HAS_D, bool HAS_Z, bool HAS_BIAS, bool SOFTPLUS, bool HAS_H0,
          bool HAS_SEED, bool VEC>
__global__ void __launch_bounds__(NT, 1) ssm_bwd(
    const typename Elem<DT>::T* __restrict__ u, const typename Elem<DT>::T* __restrict__ dt,
    const typename Elem<DT>::T* __restrict__ z, const typename Elem<DT>::T* __restrict__ dout,
    const float* __restrict__ A,      // (D, N)
    const float* __restrict__ Bm,     // (B, G, N, L) fp32
    const float* __restrict__ Cm,     // (B, G, N, L) fp32
    const float* __restrict__ Dv,     // (D,)
    const float* __restrict__ bias,   // (D,)
    const float* __restrict__ ckpt,   // (B, n_ck, N, D): state at every SEG-th step
    const float* __restrict__ seeds,  // (B, S, D, N): adjoint past each time segment's end
    typename Elem<DT>::T* __restrict__ du, typename Elem<DT>::T* __restrict__ ddt,
    typename Elem<DT>::T* __restrict__ dz,
    float* __restrict__ dA_part,      // (B * S, D, N)
    float* __restrict__ dB, float* __restrict__ dC,  // (B, G, N, L), zeroed; atomics
    float* __restrict__ dD_part, float* __restrict__ dbias_part,  // (B * S, D)
    float* __restrict__ dh0,          // (B, D, N)
    int L, int D, int N, int G, int Dg, int n_blk_g, int n_ck, int ck_per_seg) {
    extern __shared__ float4 smem4[];
    float4* sH = smem4;                        // [KS][2][NT] float4: sub-chunk start states
    float4* sHs = sH + KS * 2 * NT;            // [TS][2][NT] float4: states of one sub-chunk
    float* sB = reinterpret_cast<float*>(sHs + TS * 2 * NT);  // [SEG][NP]
    float* sC = sB + SEG * NP;                 // [SEG][NP]
    float* sR = sC + SEG * NP;                 // [2][NT / 32][TS][2 * NP]: per-warp sums

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, half = lane >> 4;
    const int blk = blockIdx.x, b = blockIdx.y, seg = blockIdx.z, S = gridDim.z;
    const int g = blk / n_blk_g;
    const int c_in_g = (blk % n_blk_g) * CH + ((warp << 4) | (lane & 15));
    const bool valid = c_in_g < Dg;
    const int d = g * Dg + (valid ? c_in_g : 0);  // invalid lanes read channel 0, never write
    const long row = ((long)b * D + d) * L;
    const int n0 = half * HALF;
    const long bs = (long)b * S + seg;
    const float vmask = valid ? 1.f : 0.f;

    float A2[HALF], sd[HALF], dAacc[HALF];
#pragma unroll
    for (int j = 0; j < HALF; ++j) {
        const int n = n0 + j;
        A2[j] = (valid && n < N) ? A[(long)d * N + n] * LOG2E : 0.f;
        dAacc[j] = 0.f;
        sd[j] = 0.f;
    }
    const float bias_v = HAS_BIAS ? bias[d] : 0.f;
    const float D_v = HAS_D ? Dv[d] : 0.f;
    float dD_acc = 0.f, dbias_acc = 0.f;

    const int ck_lo = seg * ck_per_seg;
    const int ck_hi = min(n_ck, ck_lo + ck_per_seg);
    const int t_end = min(L, ck_hi * SEG);  // one past this time segment's last step
    if (HAS_SEED) {
        // carry = exp(delta_{t_end} A) * seed (1 past the sequence's end)
        float delta = 0.f;
        if (t_end < L) {
            const float r = Elem<DT>::f(dt[row + t_end]) + bias_v;
            delta = SOFTPLUS ? softplus(r) : r;
        }
#pragma unroll
        for (int j = 0; j < HALF; ++j) {
            const int n = n0 + j;
            const float seed = (valid && n < N) ? seeds[(bs * D + d) * N + n] : 0.f;
            sd[j] = seed * ex2(delta * A2[j]);
        }
    }
    const float* Bb = Bm + ((long)b * G + g) * N * L;
    const float* Cb = Cm + ((long)b * G + g) * N * L;
    float* dBb = dB + ((long)b * G + g) * N * L;
    float* dCb = dC + ((long)b * G + g) * N * L;
    int buf = 0;

    for (int ck = ck_hi - 1; ck >= ck_lo; --ck) {
        const int t0 = ck * SEG;
        const int nseg = min(SEG, L - t0);
        __syncthreads();  // everyone is done with the previous segment's rows
        for (int i = tid; i < SEG * NP; i += NT) {
            const int n = i / SEG, t = i % SEG;  // global reads run along time
            const bool ok = n < N && t < nseg;
            sB[t * NP + n] = ok ? Bb[(long)n * L + t0 + t] : 0.f;
            sC[t * NP + n] = ok ? Cb[(long)n * L + t0 + t] : 0.f;
        }
        float h[HALF];
#pragma unroll
        for (int j = 0; j < HALF; ++j) {
            const int n = n0 + j;
            h[j] = (valid && n < N) ? ckpt[(((long)b * n_ck + ck) * N + n) * D + d] : 0.f;
        }
        if (ck > ck_lo) {
            // the previous segment's lines into L2 while this one computes: its rows of the
            // four streams (SEG steps), its saved state, its B and C rows
            const long tp = row + t0 - SEG;
            prefetch_l2(u + tp);
            prefetch_l2(dt + tp);
            prefetch_l2(dout + tp);
            if (HAS_Z) prefetch_l2(z + tp);
            if (DT == 0) {  // fp32 rows span two lines
                prefetch_l2(u + tp + 32);
                prefetch_l2(dt + tp + 32);
                prefetch_l2(dout + tp + 32);
                if (HAS_Z) prefetch_l2(z + tp + 32);
            }
            const int n = n0 + (lane & 7);  // 8 lanes per half cover its 8 states
            if (n < N) prefetch_l2(ckpt + (((long)b * n_ck + ck - 1) * N + n) * D + d);
            if (tid < 2 * N) {
                const float* src = (tid < N ? Bb : Cb) + (long)(tid % N) * L + t0 - SEG;
                prefetch_l2(src);
                prefetch_l2(src + 32);
            }
        }
        __syncthreads();

        // pass A: the state at the start of every sub-chunk; with VEC the next sub-chunk's
        // rows are loaded one iteration ahead
        const int n_sub = (nseg + TS - 1) / TS;
        Raw<DT> nu, nd;
        if (VEC && n_sub > 1) {
            nu = raw_load<DT>(u + row + t0);
            nd = raw_load<DT>(dt + row + t0);
        }
        for (int k = 0; k < n_sub; ++k) {
            sH[(k * 2 + 0) * NT + tid] = make_float4(h[0], h[1], h[2], h[3]);
            sH[(k * 2 + 1) * NT + tid] = make_float4(h[4], h[5], h[6], h[7]);
            if (k == n_sub - 1) break;
            float uu[TS], rr[TS];
            if (VEC) {
                raw_unpack<DT>(nu, uu);
                raw_unpack<DT>(nd, rr);
                if (k + 2 < n_sub) {
                    nu = raw_load<DT>(u + row + t0 + (k + 1) * TS);
                    nd = raw_load<DT>(dt + row + t0 + (k + 1) * TS);
                }
            } else {
                load_ts<DT>(u + row + t0 + k * TS, TS, uu);
                load_ts<DT>(dt + row + t0 + k * TS, TS, rr);
            }
#pragma unroll
            for (int tt = 0; tt < TS; ++tt) {
                const float r = rr[tt] + bias_v;
                const float delta = SOFTPLUS ? softplus(r) : r;
                const float x = delta * uu[tt] * vmask;
                const float4* Br = reinterpret_cast<const float4*>(sB + (k * TS + tt) * NP + n0);
                const float4 b0 = Br[0], b1 = Br[1];
                const float Bj[HALF] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
                for (int j = 0; j < HALF; ++j) h[j] = fmaf(ex2(delta * A2[j]), h[j], x * Bj[j]);
            }
        }

        // pass B and the adjoint, sub-chunks from the last
        for (int k = n_sub - 1; k >= 0; --k) {
            const int tk = t0 + k * TS;
            const int nv = min(TS, L - tk);
            {
                const float4 h0v = sH[(k * 2 + 0) * NT + tid], h1v = sH[(k * 2 + 1) * NT + tid];
                h[0] = h0v.x; h[1] = h0v.y; h[2] = h0v.z; h[3] = h0v.w;
                h[4] = h1v.x; h[5] = h1v.y; h[6] = h1v.z; h[7] = h1v.w;
            }
            float uu[TS], rr[TS], gg[TS], dl[TS];
            float dAs[TS][HALF];
            float dzv[TS];
            float zz[TS];
            if (VEC && nv == TS) {  // all four loads in flight before the first use
                const Raw<DT> ru = raw_load<DT>(u + row + tk), rd = raw_load<DT>(dt + row + tk);
                const Raw<DT> rg = raw_load<DT>(dout + row + tk);
                Raw<DT> rz;
                if (HAS_Z) rz = raw_load<DT>(z + row + tk);
                raw_unpack<DT>(ru, uu);
                raw_unpack<DT>(rd, rr);
                raw_unpack<DT>(rg, gg);
                if (HAS_Z) raw_unpack<DT>(rz, zz);
            } else {
                load_ts<DT>(u + row + tk, nv, uu);
                load_ts<DT>(dt + row + tk, nv, rr);
                load_ts<DT>(dout + row + tk, nv, gg);
                if (HAS_Z) load_ts<DT>(z + row + tk, nv, zz);
            }
#pragma unroll
            for (int tt = 0; tt < TS; ++tt) {
                uu[tt] *= vmask;
                gg[tt] *= vmask;
                const float r = rr[tt] + bias_v;
                rr[tt] = r;
                const float delta = tt < nv ? (SOFTPLUS ? softplus(r) : r) : 0.f;
                dl[tt] = delta;
                const float x = delta * uu[tt];
                const float4* Br = reinterpret_cast<const float4*>(sB + (k * TS + tt) * NP + n0);
                const float4* Cr = reinterpret_cast<const float4*>(sC + (k * TS + tt) * NP + n0);
                const float4 b0 = Br[0], b1 = Br[1], c0 = Cr[0], c1 = Cr[1];
                const float Bj[HALF] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
                const float Cj[HALF] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
                float yp = 0.f;
#pragma unroll
                for (int j = 0; j < HALF; ++j) {
                    dAs[tt][j] = ex2(delta * A2[j]);
                    h[j] = fmaf(dAs[tt][j], h[j], x * Bj[j]);
                    yp = fmaf(Cj[j], h[j], yp);
                }
                sHs[(tt * 2 + 0) * NT + tid] = make_float4(h[0], h[1], h[2], h[3]);
                sHs[(tt * 2 + 1) * NT + tid] = make_float4(h[4], h[5], h[6], h[7]);
                if (HAS_Z) {
                    const float y = yp + __shfl_xor_sync(FULL, yp, 16) + D_v * uu[tt];
                    const float zt = zz[tt];
                    const float sz = sigmoid(zt);
                    dzv[tt] = gg[tt] * y * sz * (1.f + zt * (1.f - sz));
                    gg[tt] = gg[tt] * zt * sz;
                }
            }
            if (HAS_Z && valid && half == 0) store_ts<DT, VEC>(dz + row + tk, nv, dzv);

            float duv[TS], ddv[TS];
            float* sRw = sR + ((buf * (NT / 32) + warp) * TS) * (2 * NP);
#pragma unroll
            for (int tt = TS - 1; tt >= 0; --tt) {
                const float4* Br = reinterpret_cast<const float4*>(sB + (k * TS + tt) * NP + n0);
                const float4* Cr = reinterpret_cast<const float4*>(sC + (k * TS + tt) * NP + n0);
                const float4 b0 = Br[0], b1 = Br[1], c0 = Cr[0], c1 = Cr[1];
                const float Bj[HALF] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
                const float Cj[HALF] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
                const float4 h0v = sHs[(tt * 2 + 0) * NT + tid], h1v = sHs[(tt * 2 + 1) * NT + tid];
                const float hj[HALF] = {h0v.x, h0v.y, h0v.z, h0v.w, h1v.x, h1v.y, h1v.z, h1v.w};
                const float gt = gg[tt], x = dl[tt] * uu[tt];
                float sB_ = 0.f, Af = 0.f;
                float v[16];
#pragma unroll
                for (int j = 0; j < HALF; ++j) {
                    const float s = fmaf(Cj[j], gt, sd[j]);
                    const float e = fmaf(-x, Bj[j], hj[j]);
                    const float se = s * e;
                    dAacc[j] = fmaf(dl[tt], se, dAacc[j]);
                    Af = fmaf(se, A2[j], Af);
                    sB_ = fmaf(s, Bj[j], sB_);
                    v[j] = s * x;
                    v[HALF + j] = hj[j] * gt;
                    sd[j] = dAs[tt][j] * s;
                }
                sB_ += __shfl_xor_sync(FULL, sB_, 16);
                Af += __shfl_xor_sync(FULL, Af, 16);
                float dd = Af * LN2 + uu[tt] * sB_;
                if (SOFTPLUS) dd *= sigmoid(rr[tt]);
                dd = tt < nv ? dd : 0.f;
                ddv[tt] = dd;
                duv[tt] = dl[tt] * sB_ + D_v * gt;
                if (HAS_D) dD_acc = fmaf(gt, uu[tt], dD_acc);
                if (HAS_BIAS) dbias_acc += dd;
                // lane (lane & 15) = kind * 8 + j holds the warp's sum for state n0 + j
                const float r = transpose_reduce16(v, lane);
                const int li = lane & 15;
                sRw[tt * (2 * NP) + (li >> 3) * NP + n0 + (li & 7)] = r;
            }
            if (valid && half == 0) {
                store_ts<DT, VEC>(du + row + tk, nv, duv);
                store_ts<DT, VEC>(ddt + row + tk, nv, ddv);
            }
            __syncthreads();  // the warps' sums of this sub-chunk are in sR[buf]
            for (int i = tid; i < TS * 2 * NP; i += NT) {
                const int tt = i / (2 * NP), kind = (i / NP) & 1, n = i % NP;
                float acc = 0.f;
#pragma unroll
                for (int w = 0; w < NT / 32; ++w) acc += sR[((buf * (NT / 32) + w) * TS) * (2 * NP) + i];
                if (tt < nv && n < N) atomicAdd((kind ? dCb : dBb) + (long)n * L + tk + tt, acc);
            }
            buf ^= 1;  // the other buffer is free: its readers passed the barrier above
        }
    }

    // partials of this (batch, time segment)
#pragma unroll
    for (int j = 0; j < HALF; ++j) {
        const int n = n0 + j;
        if (valid && n < N) {
            dA_part[(bs * D + d) * N + n] = dAacc[j];
            if (HAS_H0 && seg == 0) dh0[((long)b * D + d) * N + n] = sd[j];
        }
    }
    if (valid && half == 0) {
        if (HAS_D) dD_part[bs * D + d] = dD_acc;
        if (HAS_BIAS) dbias_part[bs * D + d] = dbias_acc;
    }
}
