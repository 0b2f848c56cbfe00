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
template <int W, int M>
__device__ __forceinline__ void xreduce_level(float (&v)[M], bool up) {
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

// ------------------------------------------------------------------------------------------
// v11: the backward in the forward's layout (ssm_bwd4; KERNEL_NOTES v11)
// ------------------------------------------------------------------------------------------
// Why: v9 keeps two threads per channel, so the per-step scalar work (loads, softplus, gate,
// du/ddelta) is done twice, a block needs 255 registers (8 warps per SM), and the issue shape
// fills the SMs only with time segments and a separate seeds pass. Here, as in ssm_fwd
// (scan_fwd.cu), a warp holds 8 channels x 4 state groups (lane = q * 8 + c: states
// 4q .. 4q+3 of channel c) and a block 4 warps = 32 channels: 168 registers and ~70 KB of
// shared memory leave 3 blocks (12 warps) per SM, and the issue shape's 384 blocks run in one
// wave with no seeds pass.
//
// Per checkpoint segment (SEG = 64 steps, walked from the end):
//   S1 lane q computes delta and delta u of sub-chunks q and q + 4 (8 steps each) once per
//      channel into shared memory (sX); B and C rows of the segment are staged once (sBC);
//   R1 all lanes replay the forward from the saved state for 56 steps and keep the state at
//      the start of every 8-step sub-chunk (sH);
//   per sub-chunk, from the last:
//   R2 replay its 8 steps from sH: states and exp(delta A) stay in registers (64), partial
//      C . h per lane to shared memory (sP, used as sY);
//   G  lane q owns steps 2q, 2q+1: y from the 4 lanes' partials, dz, the gated dout g (sG);
//   J  the adjoint walks the 8 steps backwards (s = C g + exp(delta' A) s'), accumulating dA
//      and per-lane partials of sum_n s B and sum_n s e A (sP); the channel sums dB, dC of
//      each step by a transpose-reduce over the 8 lanes of a state group (shuffles: the
//      shared-memory pipe is the busiest unit), the 4 warps' sums through sRB;
//   F  lane q: du and ddelta of its 2 steps; then one fp32 atomic per (kind, state, step)
//      per block adds the block's dB, dC to global memory (with DET4, a plain store into the
//      block's slice).
#define Q4 4          // lanes (state groups) per channel
#define S4 4          // states per lane
#define C4 8          // channels per warp
#define W4 4          // warps per block
#define CH4 (C4 * W4) // channels per block
#define NT4 (W4 * 32) // threads per block
#define NSUB (SEG / TS)  // sub-chunks per checkpoint segment
#define PROW 20       // floats per (q, c) row of sP: 8 steps x 2 + padding (banks)
#define GROW 12       // floats per channel row of sG: 8 steps + padding
#define RBROW 9       // floats per value row of sRB: 8 steps + padding
#ifndef MINB4
#define MINB4 3       // resident blocks per SM the register budget must allow
#endif
#ifndef DET4
// 1: deterministic dB, dC. Each channel block of a group stores its sums in its own slice of
// dB, dC, then (n_blk_g, B, G, N, L), and the launcher adds the slices in a fixed order; 0: one
// fp32 atomic per value and block, whose order (and so the last bits) varies between runs.
#define DET4 0
#endif
// shared memory of ssm_bwd4, offsets in floats (every region 16-byte aligned)
#define SM4_BC 0                                     // [2][SEG * 4] float4: B, C rows
#define SM4_X (SM4_BC + 2 * SEG * NP)                // [W4][SEG / 2][C4] float4: (delta, x) x 2
#define SM4_H (SM4_X + W4 * (SEG / 2) * C4 * 4)      // [NSUB][NT4] float4: sub-chunk states
#define SM4_P (SM4_H + NSUB * NT4 * 4)               // [W4][Q4 * C4][PROW]: partials
#define SM4_G (SM4_P + W4 * Q4 * C4 * PROW)          // [W4][C4][GROW]: gated dout
#define SM4_RB (SM4_G + W4 * C4 * GROW)              // [2][W4][32][RBROW]: warps' sums
#define SM4_END (SM4_RB + 2 * W4 * 32 * RBROW)

// Two consecutive steps of one row at p (an even step when VEC); rem = steps of the row from p
// on (<= 0 past its end), the missing ones read as 0. The tests are plain comparisons of rem:
// written as nv = max(0, min(2, rem)) and `nv == 2`, the compiled kernel (ptxas branching on
// the clamp's predicate, VIMNMX.RELU) read and wrote past the end of rows with a partial last
// checkpoint segment (KERNEL_NOTES v11). With VEC (L % 8 == 0, even steps) rem is even: both
// steps are in the row or neither, and the load is branch-free (from `safe`, an address in the
// row, when past the end), so that its latency can hide behind the work issued after it.
template <int DT, bool VEC>
__device__ __forceinline__ void load2(const typename Elem<DT>::T* p,
                                      const typename Elem<DT>::T* safe, int rem, float (&o)[2]) {
    if (VEC) {
        const bool in = rem > 0;
        const typename Elem<DT>::T* a = in ? p : safe;
        if constexpr (DT == 0) {
            const float2 v = *reinterpret_cast<const float2*>(a);
            o[0] = in ? v.x : 0.f;
            o[1] = in ? v.y : 0.f;
        } else {
            const unsigned w = in ? *reinterpret_cast<const unsigned*>(a) : 0u;
            o[0] = Elem<DT>::f((u16)(w & 0xffffu));
            o[1] = Elem<DT>::f((u16)(w >> 16));
        }
    } else {
        o[0] = rem > 0 ? Elem<DT>::f(p[0]) : 0.f;
        o[1] = rem > 1 ? Elem<DT>::f(p[1]) : 0.f;
    }
}

template <int DT, bool VEC>
__device__ __forceinline__ void store2(typename Elem<DT>::T* p, int rem, const float (&v)[2]) {
    if (VEC && rem >= 2) {
        if constexpr (DT == 0) {
            *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
        } else {
            *reinterpret_cast<unsigned*>(p) =
                (unsigned)Elem<DT>::t(v[0]) | ((unsigned)Elem<DT>::t(v[1]) << 16);
        }
    } else {
        if (rem > 0) p[0] = Elem<DT>::t(v[0]);
        if (rem > 1) p[1] = Elem<DT>::t(v[1]);
    }
}

template <int DT, bool HAS_D, bool HAS_Z, bool HAS_BIAS, bool SOFTPLUS, bool HAS_H0,
          bool HAS_SEED, bool VEC>
__global__ void __launch_bounds__(NT4, MINB4) ssm_bwd4(
    const typename Elem<DT>::T* __restrict__ u, const typename Elem<DT>::T* __restrict__ dt,
    const typename Elem<DT>::T* __restrict__ z, const typename Elem<DT>::T* __restrict__ dout,
    const float* __restrict__ A,      // (D, N)
    const float* __restrict__ Brows,  // (B, G, L, NP) fp32: one row of states per step
    const float* __restrict__ Crows,  // (B, G, L, NP) fp32
    const float* __restrict__ Dv,     // (D,)
    const float* __restrict__ bias,   // (D,)
    const float* __restrict__ ckpt,   // (B, n_ck, N, D): state at every SEG-th step
    const float* __restrict__ seeds,  // (B, S, D, N): adjoint past each time segment's end
    typename Elem<DT>::T* __restrict__ du, typename Elem<DT>::T* __restrict__ ddt,
    typename Elem<DT>::T* __restrict__ dz,
    float* __restrict__ dA_part,      // (B * S, D, N)
    float* __restrict__ dB, float* __restrict__ dC,  // (B, G, N, L), zeroed; atomics (DET4:
                                                     // (n_blk_g, B, G, N, L), stores)
    float* __restrict__ dD_part, float* __restrict__ dbias_part,  // (B * S, D)
    float* __restrict__ dh0,          // (B, D, N)
    int L, int D, int N, int G, int Dg, int n_blk_g, int n_ck, int ck_per_seg) {
    extern __shared__ float4 smem4[];
    {
        unsigned have;  // the launcher's size (cuda_scan.smem_bytes4) must cover the layout
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
        if (have < SM4_END * 4) __trap();
    }
    float* const smf = reinterpret_cast<float*>(smem4);
    float4* const sBC = smem4 + SM4_BC / 4;
    float4* const sX = smem4 + SM4_X / 4;
    float4* const sH = smem4 + SM4_H / 4;
    float* const sP = smf + SM4_P;
    float* const sG = smf + SM4_G;
    float* const sRB = smf + SM4_RB;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int q = lane >> 3, c = lane & 7;
    const int blk = blockIdx.x, b = blockIdx.y, seg = blockIdx.z, S = gridDim.z;
    const int g = blk / n_blk_g;
    const int c0 = (blk % n_blk_g) * CH4;  // the block's first channel in its group
    const int c_in_g = c0 + warp * C4 + c;
    const bool valid = c_in_g < Dg;
    const int d = g * Dg + (valid ? c_in_g : 0);  // idle lanes compute channel 0, never write
    const long row = ((long)b * D + d) * L;
    const long bs = (long)b * S + seg;
    const float vmask = valid ? 1.f : 0.f;  // idle lanes add nothing to the channel sums

    float A2[S4], sd[S4], dAacc[S4];
#pragma unroll
    for (int j = 0; j < S4; ++j) {
        const int n = q * S4 + j;
        A2[j] = n < N ? A[(long)d * N + n] * LOG2E : 0.f;
        sd[j] = 0.f;
        dAacc[j] = 0.f;
    }
    const float bias_v = HAS_BIAS ? bias[d] : 0.f;
    const float D_v = HAS_D ? Dv[d] : 0.f;
    float dD_acc = 0.f, dbias_acc = 0.f;

    const int ck_lo = seg * ck_per_seg;
    const int ck_hi = min(n_ck, ck_lo + ck_per_seg);
    const int t_end = min(L, ck_hi * SEG);  // one past this time segment's last step
    if (HAS_SEED) {
        // sd = exp(delta_{t_end} A) * seed: the adjoint carried into the segment's last step
        float delta = 0.f;
        if (t_end < L) {
            const float r = Elem<DT>::f(dt[row + t_end]) + bias_v;
            delta = SOFTPLUS ? softplus(r) : r;
        }
#pragma unroll
        for (int j = 0; j < S4; ++j) {
            const int n = q * S4 + j;
            const float seed = (valid && n < N) ? seeds[(bs * D + d) * N + n] : 0.f;
            sd[j] = seed * ex2(delta * A2[j]);
        }
    }
    const long bc_base = ((long)b * G + g) * L * NP;
    const long slice = DET4 ? (long)(blk % n_blk_g) * gridDim.y * G * N * L : 0;
    float* const dBb = dB + slice + ((long)b * G + g) * N * L;
    float* const dCb = dC + slice + ((long)b * G + g) * N * L;
    const float4* const sB = sBC;
    const float4* const sC = sBC + SEG * 4;
    float4* const sXw = sX + warp * (SEG / 2) * C4;  // this warp's (delta, x) pairs
    float* const sPw = sP + warp * Q4 * C4 * PROW;
    float* const sGc = sG + (warp * C4 + c) * GROW;
    // after the transpose-reduce lane (q, c) holds the warp's sum of value c of its state
    // group: kind c >> 2 (dB, dC), state 4q + (c & 3); i = kind * 16 + state
    const int i_sum = (c >> 2) * 16 + S4 * q + (c & 3);
    int rb = 0;

#pragma unroll 1
    for (int ck = ck_hi - 1; ck >= ck_lo; --ck) {
        const int t0 = ck * SEG;
        float h[S4];  // the saved state (its loads overlap the staging below)
#pragma unroll
        for (int j = 0; j < S4; ++j) {
            const int n = q * S4 + j;
            h[j] = n < N ? ckpt[(((long)b * n_ck + ck) * N + n) * D + d] : 0.f;
        }
        __syncthreads();  // the previous segment's readers of sBC and sX are done
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // B, C rows: 2 x 64 steps x 4 float4 over 128 threads
            const int kind = i >> 1, st = (i & 1) * 32 + (tid >> 2), t = t0 + st;
            const float* src = kind ? Crows : Brows;
            sBC[kind * SEG * 4 + st * 4 + (tid & 3)] =
                t < L ? reinterpret_cast<const float4*>(src + bc_base + (long)t * NP)[tid & 3]
                      : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        // S1: delta and delta u of this lane's sub-chunks q and q + 4 (0 past the end)
#pragma unroll
        for (int hk = 0; hk < 2; ++hk) {
            const int k = q + Q4 * hk, tk = t0 + k * TS;
            const int rem = L - tk;  // compared as is (see load2)
            const int nv = rem < 0 ? 0 : (rem < TS ? rem : TS);
            float uu[TS], rr[TS];
            if (VEC && rem >= TS) {
                const Raw<DT> ru = raw_load<DT>(u + row + tk), rd = raw_load<DT>(dt + row + tk);
                raw_unpack<DT>(ru, uu);
                raw_unpack<DT>(rd, rr);
            } else {
                load_ts<DT>(u + row + tk, nv, uu);
                load_ts<DT>(dt + row + tk, nv, rr);
            }
            float dl[TS];
#pragma unroll
            for (int i = 0; i < TS; ++i) {
                const float r = rr[i] + bias_v;
                dl[i] = (SOFTPLUS ? softplus(r) : r) * (i < rem ? 1.f : 0.f);
            }
#pragma unroll
            for (int i = 0; i < TS; i += 2)
                sXw[((k * TS + i) >> 1) * C4 + c] = make_float4(
                    dl[i], dl[i] * uu[i] * vmask, dl[i + 1], dl[i + 1] * uu[i + 1] * vmask);
        }
        if (ck > ck_lo) {
            // the previous segment into L2 while this one computes: one stream row per lane
            // (64 steps = one 128-byte line of bf16), its saved state, its B and C rows
            const long tp = row + t0 - SEG;
            const typename Elem<DT>::T* sp = q == 0 ? u : q == 1 ? dt : q == 2 ? dout
                                           : (HAS_Z ? z : dout);
            prefetch_l2(sp + tp);
            if (DT == 0) prefetch_l2(sp + tp + 32);
            if (tid < N)
                prefetch_l2(ckpt + (((long)b * n_ck + ck - 1) * N + tid) * D + g * Dg + c0);
            if (tid >= 64) {
                const int li = tid - 64;  // 2 kinds x 32 lines of 128 bytes
                prefetch_l2((li >> 5 ? Crows : Brows) + bc_base + (long)(t0 - SEG) * NP +
                            (li & 31) * 32);
            }
        }
        __syncthreads();  // sBC and sX complete

        // R1: the forward from the saved state; the state before each sub-chunk into sH.
        // Steps in software-pipelined groups of 4 as in ssm_fwd: group g+1's loads and exp2
        // are issued before group g's updates.
        {
            float xg[4], dA[4][S4];
            float4 bq[4];
            auto load_group = [&](int tg, float (&xg_)[4], float (&dA_)[4][S4],
                                  float4 (&bq_)[4]) {
                const float4 p0 = sXw[(2 * tg) * C4 + c], p1 = sXw[(2 * tg + 1) * C4 + c];
                const float dlg[4] = {p0.x, p0.z, p1.x, p1.z};
                xg_[0] = p0.y; xg_[1] = p0.w; xg_[2] = p1.y; xg_[3] = p1.w;
#pragma unroll
                for (int sg = 0; sg < 4; ++sg) {
                    bq_[sg] = sB[(4 * tg + sg) * Q4 + q];
#pragma unroll
                    for (int j = 0; j < S4; ++j) dA_[sg][j] = ex2(dlg[sg] * A2[j]);
                }
            };
            constexpr int NG = (SEG - TS) / 4;  // the last sub-chunk's steps are not needed
            load_group(0, xg, dA, bq);
#pragma unroll
            for (int tg = 0; tg < NG; ++tg) {
                if ((tg & 1) == 0) sH[(tg >> 1) * NT4 + tid] = make_float4(h[0], h[1], h[2], h[3]);
                float nxg[4], ndA[4][S4];
                float4 nbq[4];
                if (tg + 1 < NG) load_group(tg + 1, nxg, ndA, nbq);
#pragma unroll
                for (int sg = 0; sg < 4; ++sg) {
                    const float bj[S4] = {bq[sg].x, bq[sg].y, bq[sg].z, bq[sg].w};
#pragma unroll
                    for (int j = 0; j < S4; ++j) h[j] = fmaf(dA[sg][j], h[j], xg[sg] * bj[j]);
                }
                if (tg + 1 < NG) {
#pragma unroll
                    for (int sg = 0; sg < 4; ++sg) {
                        xg[sg] = nxg[sg];
                        bq[sg] = nbq[sg];
#pragma unroll
                        for (int j = 0; j < S4; ++j) dA[sg][j] = ndA[sg][j];
                    }
                }
            }
            sH[(NSUB - 1) * NT4 + tid] = make_float4(h[0], h[1], h[2], h[3]);
        }

#pragma unroll 1
        for (int k = NSUB - 1; k >= 0; --k) {
            const int tk = t0 + k * TS;
            const float4* const sXk = sXw + (k * TS / 2) * C4 + c;  // pairs of this sub-chunk
            // G's loads (lane q owns steps 2q, 2q+1) issued first: their latency (L2, the
            // segment was prefetched) hides behind R2 instead of stalling G (ncu, v11a)
            const int tq = tk + 2 * q;
            const int rem2 = L - tq;  // steps of the row from tq on (see load2)
            float u2[2], r2[2], g2[2], z2[2];
            load2<DT, VEC>(u + row + tq, u + row, rem2, u2);
            load2<DT, VEC>(dout + row + tq, dout + row, rem2, g2);
            if (SOFTPLUS) load2<DT, VEC>(dt + row + tq, dt + row, rem2, r2);
            if (HAS_Z) load2<DT, VEC>(z + row + tq, z + row, rem2, z2);
            // R2: the sub-chunk's 8 steps from its start state; states and exp(delta A) kept
            float hs[TS][S4], dA[TS][S4];
            {
                const float4 hv = sH[k * NT4 + tid];
                float hh[S4] = {hv.x, hv.y, hv.z, hv.w};
                float yp[TS];
#pragma unroll
                for (int st = 0; st < TS; ++st) {
                    const float4 p = sXk[(st >> 1) * C4];
                    const float delta = (st & 1) ? p.z : p.x, x = (st & 1) ? p.w : p.y;
                    const float4 bq = sB[(k * TS + st) * Q4 + q];
                    const float bj[S4] = {bq.x, bq.y, bq.z, bq.w};
#pragma unroll
                    for (int j = 0; j < S4; ++j) {
                        dA[st][j] = ex2(delta * A2[j]);
                        hh[j] = fmaf(dA[st][j], hh[j], x * bj[j]);
                        hs[st][j] = hh[j];
                    }
                    if (HAS_Z) {  // y is only needed for dz
                        const float4 cq = sC[(k * TS + st) * Q4 + q];
                        yp[st] = fmaf(cq.x, hh[0], fmaf(cq.y, hh[1], fmaf(cq.z, hh[2], cq.w * hh[3])));
                    }
                }
                if (HAS_Z) {
                    float* yrow = sPw + (q * C4 + c) * PROW;
                    *reinterpret_cast<float4*>(yrow) = make_float4(yp[0], yp[1], yp[2], yp[3]);
                    *reinterpret_cast<float4*>(yrow + 4) = make_float4(yp[4], yp[5], yp[6], yp[7]);
                }
            }
            __syncwarp();

            // G: lane q owns steps 2q, 2q+1: y, dz and the gated dout g
            if (HAS_Z) {
                float y2[2], dz2[2];
#pragma unroll
                for (int i = 0; i < 2; ++i) y2[i] = HAS_D ? D_v * u2[i] : 0.f;
#pragma unroll
                for (int qq = 0; qq < Q4; ++qq) {
                    const float2 v = *reinterpret_cast<const float2*>(sPw + (qq * C4 + c) * PROW + 2 * q);
                    y2[0] += v.x;
                    y2[1] += v.y;
                }
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const float sz = sigmoid(z2[i]);
                    dz2[i] = g2[i] * y2[i] * sz * (1.f + z2[i] * (1.f - sz));
                    g2[i] = g2[i] * z2[i] * sz;
                }
                if (valid) store2<DT, VEC>(dz + row + tq, rem2, dz2);
            }
            g2[0] *= vmask;
            g2[1] *= vmask;
            *reinterpret_cast<float2*>(sGc + 2 * q) = make_float2(g2[0], g2[1]);
            __syncwarp();  // sG complete; the partials of y are read (sP is reused below)

            // J: the adjoint, the sub-chunk's steps backwards
            float* const prow = sPw + (q * C4 + c) * PROW;
            float pacc[4];
#pragma unroll
            for (int st = TS - 1; st >= 0; --st) {
                const float4 p = sXk[(st >> 1) * C4];
                const float delta = (st & 1) ? p.z : p.x, x = (st & 1) ? p.w : p.y;
                const float gt = sG[(warp * C4 + c) * GROW + st];
                const float4 bq = sB[(k * TS + st) * Q4 + q], cq = sC[(k * TS + st) * Q4 + q];
                const float bj[S4] = {bq.x, bq.y, bq.z, bq.w};
                const float cj[S4] = {cq.x, cq.y, cq.z, cq.w};
                float Af = 0.f, sBs = 0.f, vB[S4], vC[S4];
#pragma unroll
                for (int j = 0; j < S4; ++j) {
                    const float s = fmaf(cj[j], gt, sd[j]);
                    const float e = fmaf(-x, bj[j], hs[st][j]);  // exp(delta A) h_{t-1}
                    const float se = s * e;
                    dAacc[j] = fmaf(delta, se, dAacc[j]);
                    Af = fmaf(se, A2[j], Af);
                    sBs = fmaf(s, bj[j], sBs);
                    vB[j] = s * x;
                    vC[j] = hs[st][j] * gt;
                    sd[j] = dA[st][j] * s;
                }
                if (st & 1) {
                    pacc[2] = Af;
                    pacc[3] = sBs;
                } else {
                    pacc[0] = Af;
                    pacc[1] = sBs;
                    *reinterpret_cast<float4*>(prow + 2 * st) =
                        make_float4(pacc[0], pacc[1], pacc[2], pacc[3]);
                }
                // this step's dB, dC summed over the warp's 8 channels (lanes c = 0..7 of this
                // state group: xor 4, 2, 1), 7 shuffles for the 8 values
                float v[2 * S4] = {vB[0], vB[1], vB[2], vB[3], vC[0], vC[1], vC[2], vC[3]};
                xreduce_level<4>(v, (c & 4) != 0);
                xreduce_level<2>(v, (c & 2) != 0);
                xreduce_level<1>(v, (c & 1) != 0);
                sRB[((rb * W4 + warp) * 32 + i_sum) * RBROW + st] = v[0];
            }
            __syncwarp();  // the partials of sum_n s B and sum_n s e A are in sP

            // F: du and ddelta of this lane's 2 steps
            {
                float4 P = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
                for (int qq = 0; qq < Q4; ++qq) {
                    const float4 v = *reinterpret_cast<const float4*>(sPw + (qq * C4 + c) * PROW + 4 * q);
                    P.x += v.x; P.y += v.y; P.z += v.z; P.w += v.w;
                }
                const float4 p = sXk[q * C4];  // (delta, x) of steps 2q, 2q+1
                const float dl2[2] = {p.x, p.z}, Afs[2] = {P.x, P.z}, sBs[2] = {P.y, P.w};
                float du2[2], dd2[2];
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    du2[i] = dl2[i] * sBs[i] + D_v * g2[i];
                    float dd = Afs[i] * LN2 + u2[i] * sBs[i];
                    if (SOFTPLUS) dd *= sigmoid(r2[i] + bias_v);
                    dd2[i] = i < rem2 ? dd : 0.f;
                    if (HAS_D) dD_acc = fmaf(g2[i], i < rem2 ? u2[i] : 0.f, dD_acc);
                    if (HAS_BIAS) dbias_acc += dd2[i];
                }
                if (valid) {
                    store2<DT, VEC>(du + row + tq, rem2, du2);
                    store2<DT, VEC>(ddt + row + tq, rem2, dd2);
                }
            }

            // the block's dB, dC of this sub-chunk: the 4 warps' sums; consecutive threads
            // take consecutive steps of one (kind, state)
            __syncthreads();
#pragma unroll
            for (int o = tid; o < 32 * TS; o += NT4) {
                const int i = o >> 3, st = o & 7, t = tk + st, n = i & 15;
                float acc = 0.f;
#pragma unroll
                for (int w = 0; w < W4; ++w) acc += sRB[((rb * W4 + w) * 32 + i) * RBROW + st];
                if (n < N && t < L) {
                    float* const dst = (i >> 4 ? dCb : dBb) + (long)n * L + t;
                    if (DET4) *dst = acc;  // this block's only write of this value
                    else atomicAdd(dst, acc);
                }
            }
            rb ^= 1;  // the other buffer's readers passed the barrier above
        }
    }

    // partials of this (batch, time segment)
#pragma unroll
    for (int j = 0; j < S4; ++j) {
        const int n = q * S4 + j;
        if (valid && n < N) {
            dA_part[(bs * D + d) * N + n] = dAacc[j];
            if (HAS_H0 && seg == 0) dh0[((long)b * D + d) * N + n] = sd[j];
        }
    }
    dD_acc += __shfl_xor_sync(FULL, dD_acc, 8);
    dD_acc += __shfl_xor_sync(FULL, dD_acc, 16);
    dbias_acc += __shfl_xor_sync(FULL, dbias_acc, 8);
    dbias_acc += __shfl_xor_sync(FULL, dbias_acc, 16);
    if (valid && q == 0) {
        if (HAS_D) dD_part[bs * D + d] = dD_acc;
        if (HAS_BIAS) dbias_part[bs * D + d] = dbias_acc;
    }
}
