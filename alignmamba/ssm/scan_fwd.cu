// Forward of the selective scan, CUDA C++ compiled at run time by NVRTC (no build step;
// alignmamba/ssm/nvrtc.py). Design and measurements: docs/KERNEL_NOTES.md, v10.
//
// Same mathematics as the Triton forward (_ssm_fwd_kernel in triton_scan.py):
//   delta_t = softplus(dt_t + bias);  h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t
//   y_t = C_t . h_t + D u_t;          out_t = y_t * z_t * sigmoid(z_t)
//
// Why this layout: the forward's busiest unit is the exp unit (one exp2 per state update), and
// the exp2 of a step do not depend on the state, so a warp has plenty of independent work; what
// it needs is (a) every SM sub-partition busy, which the issue shape (8 x 1536 channels) only
// gives with several threads per channel, and (b) the per-step scalar work (softplus, gate,
// loads, stores) done once per channel, not once per thread.
//
// A warp holds 8 channels x 4 state groups: lane = q * 8 + c, states 4q .. 4q+3 of channel c
// (NP = 16 states, N <= 16 zero-padded). Time runs in chunks of 32 steps; lane q of a channel
// owns steps 8q .. 8q+7 of a chunk for the per-step scalar work:
//   1. it loads u, dt, z of its 8 steps (16-byte loads, one chunk ahead), computes delta and
//      delta * u, and writes them to shared memory (sX);
//   2. all 4 lanes of the channel run the 32 steps for their 4 states: B and C rows of the
//      chunk are staged once per block in shared memory (sBC, double-buffered); each lane
//      writes its partial C . h of every step to shared memory (sY);
//   3. the partials go through shared memory (sY) and lane q sums its 8 steps over the 4
//      lanes, adds D u, applies the gate, and stores 16 bytes of output.
// Shared-memory layouts are chosen so that every 16-byte access of a quarter-warp (8 lanes of
// one q) hits 8 distinct bank groups.
//
// LOCAL = pass 1 of the segment-parallel forward: no C, z or output; the segment's final state
// from its start (zero) and sum_t delta_t per channel. Checkpoints: the state before every
// 64-th step, (B, n_ck, N, D) fp32, for the backward.
//
// ssm_adj_local, at the end of this file: the backward's seeds pass in the same layout,
// walking time backwards.

#include "scan_common.cuh"

#define NP 16
#define QG 4                 // state groups (lanes) per channel
#define QS 4                 // states per lane
#define CW 8                 // channels per warp
#define FW 4                 // warps per block
#define FCH (CW * FW)        // channels per block
#define CHUNK (QG * TS)      // steps per chunk
#define CKS 64               // checkpoint spacing in steps (two chunks)
#define YROW 9               // float4 per (q, c) row of sY: 8 + 1 of padding
#ifndef GS
#define GS 4                 // steps per software-pipelined group in ssm_fwd (4 or 8)
#endif
static_assert(GS % 4 == 0 && CHUNK % GS == 0, "GS: 4 or 8");
#ifndef MINB
#define MINB 3               // resident blocks per SM the register budget must allow
#endif
// BC16 = 1: B and C arrive in bf16 and travel packed, one 32-bit word per (step, state) with
// B in the low half and C in the high half (cuda_scan.rows_bc16): a lane's 4 states of B and
// C are one 16-byte shared-memory load per step instead of two, and a chunk's staging one
// 16-byte load and store per thread instead of two. bf16 -> fp32 is exact (a shift or a mask),
// so the results are bitwise those of the fp32 rows. Why: the L1/shared pipe is the forward's
// busiest unit (86%, ncu, KERNEL_NOTES v10c) and the B/C row loads are ~half its wavefronts.
#ifndef BC16
#define BC16 0
#endif

template <int DT, bool HAS_D, bool HAS_Z, bool HAS_BIAS, bool SOFTPLUS, bool HAS_H0,
          bool STORE_LAST, bool STORE_CKPT, bool LOCAL, bool VEC>
__global__ void __launch_bounds__(FW * 32, MINB) ssm_fwd(
    const typename Elem<DT>::T* __restrict__ u, const typename Elem<DT>::T* __restrict__ dt,
    const typename Elem<DT>::T* __restrict__ z,
    const float* __restrict__ A,       // (D, N)
    const float* __restrict__ Brows,   // (B, G, L, NP) fp32: one row of states per step
                                       // (BC16: packed bf16 B and C words, Crows unused)
    const float* __restrict__ Crows,   // (B, G, L, NP) fp32
    const float* __restrict__ Dv,      // (D,)
    const float* __restrict__ bias,    // (D,)
    const float* __restrict__ h0,      // (B, S, D, N): start state of each time segment
    typename Elem<DT>::T* __restrict__ out,
    float* __restrict__ last,          // (B, S, D, N): final state of each time segment
    float* __restrict__ ckpt,          // (B, n_ck, N, D)
    float* __restrict__ dsum,          // (B, S, D): sum of delta over each segment (LOCAL)
    int L, int D, int N, int G, int Dg, int n_blk_g, int seg_len, int n_ck) {
    constexpr int CI = BC16 ? 0 : 1;  // C's slot in sBC (BC16: none, C travels with B)
    __shared__ float4 sBC[2][CI + 1][CHUNK * NP / 4];  // [buf][B, C][step * 4 + q]
    __shared__ float4 sX[FW][CHUNK / 2][CW];      // (delta, delta u) of two steps per channel
    __shared__ float4 sY[FW][QG * CW * YROW];     // partial y: [q][c][32 steps + padding]
    __shared__ unsigned long long sBar[2];        // sBC[buf] written by all 128 threads

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int q = lane >> 3, c = lane & 7;
    const int blk = blockIdx.x, b = blockIdx.y, seg = blockIdx.z, S = gridDim.z;
    const int g = blk / n_blk_g;
    const int c_in_g = (blk % n_blk_g) * FCH + warp * CW + c;
    const bool valid = c_in_g < Dg;
    const int d = g * Dg + (valid ? c_in_g : 0);  // invalid lanes compute channel 0, never write
    const long row = ((long)b * D + d) * L;
    const long bs = (long)b * S + seg;
    const int l_beg = seg * seg_len;
    const int l_end = min(L, l_beg + seg_len);

    float A2[QS], h[QS];
#pragma unroll
    for (int j = 0; j < QS; ++j) {
        const int n = q * QS + j;
        A2[j] = n < N ? A[(long)d * N + n] * LOG2E : 0.f;
        h[j] = (HAS_H0 && n < N) ? h0[(bs * D + d) * N + n] : 0.f;
    }
    const float bias_v = HAS_BIAS ? bias[d] : 0.f;
    const float D_v = HAS_D ? Dv[d] : 0.f;
    float dsum_acc = 0.f;

    const long bc_base = ((long)b * G + g) * L * NP;
    // this thread's float4 of a chunk's B and C rows (128 threads x 16 bytes = 32 rows of 16)
    auto load_bc = [&](int t0, float4& nb, float4& nc) {
        const int t = t0 + (tid >> 2);
        const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
        nb = t < l_end ? reinterpret_cast<const float4*>(Brows + bc_base + (long)t * NP)[tid & 3]
                       : zero;
        if (!LOCAL && !BC16)
            nc = t < l_end ? reinterpret_cast<const float4*>(Crows + bc_base + (long)t * NP)[tid & 3]
                           : zero;
    };
    const int my = q * TS;  // this lane's first step in a chunk
    // The chunk's B/C rows are staged by all 128 threads into sBC[buf]; readers wait on the
    // mbarrier sBar[buf] (one phase per chunk of that parity), and each thread stages the next
    // chunk's rows right after its own reads of the current ones, so a warp that is ahead
    // waits only for the others' staging, not for them to reach a barrier (a __syncthreads per
    // chunk was 6% of the stall samples, ncu run 1 of the seventh session). The other buffer
    // is free by then: every thread arrived on this chunk's barrier after reading it.
    if (tid == 0) {
        mbar_init(&sBar[0], FW * 32);
        mbar_init(&sBar[1], FW * 32);
    }
    __syncthreads();
    float4 nb, nc;
    Raw<DT> ru, rd, rz;
    load_bc(l_beg, nb, nc);
    sBC[0][0][tid] = nb;
    if (!LOCAL && !BC16) sBC[0][CI][tid] = nc;
    mbar_arrive(&sBar[0]);
    if (l_beg + CHUNK < l_end) load_bc(l_beg + CHUNK, nb, nc);

    // this lane's rows from its first step of a chunk on (u_l[t] is step t + my of the row)
    const typename Elem<DT>::T* const u_l = u + row + my;
    const typename Elem<DT>::T* const dt_l = dt + row + my;
    const typename Elem<DT>::T* const z_l = (!LOCAL && HAS_Z) ? z + row + my : nullptr;
    // this lane's 8 steps of u, dt (and z) of the chunk at t as floats: from the raw words
    // issued earlier when `full` (a whole chunk of 16-byte rows), else element by element
    auto fetch = [&](int t, bool full, float (&uu_)[TS], float (&rr_)[TS], float (&zz_)[TS]) {
        if (full) {
            raw_unpack<DT>(ru, uu_);
            raw_unpack<DT>(rd, rr_);
            if (!LOCAL && HAS_Z) raw_unpack<DT>(rz, zz_);
        } else {
            // steps in the segment: <= 0 or > 8 at its ends, compared unclamped (see store_ts);
            // dt past the end reads as -inf: softplus gives delta = 0 exactly, no mask needed
            const int rem_ = l_end - t - my;
            load_ts<DT>(u_l + t, rem_, uu_);
            load_ts<DT>(dt_l + t, rem_, rr_, dt_fill<SOFTPLUS>());
            if (!LOCAL && HAS_Z) load_ts<DT>(z_l + t, rem_, zz_);
        }
    };
    auto issue = [&](int t) {  // the raw loads of this lane's 8 steps of the chunk at t
        ru = raw_load<DT>(u_l + t);
        rd = raw_load<DT>(dt_l + t);
        if (!LOCAL && HAS_Z) rz = raw_load<DT>(z_l + t);
    };
    // 1. delta and delta * u of steps i, i + 1 of this lane's 8 in the chunk at t (0 past the
    // end: the state stays), one float4 of the chunk's sX
    auto scalar_pair = [&](int i, int t, const float (&uu_)[TS], const float (&rr_)[TS],
                           float4 (*sXb)[CW]) {
        const int rem_ = l_end - t - my;
        float dl[2];
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            // without softplus, masked by a multiply (a select let nvcc branch on every step)
            const float r = rr_[i + p] + bias_v;
            dl[p] = SOFTPLUS ? softplus(r) : r * (i + p < rem_ ? 1.f : 0.f);
            if (LOCAL) dsum_acc += dl[p];
        }
        sXb[(my + i) >> 1][c] = make_float4(dl[0], dl[0] * uu_[i], dl[1], dl[1] * uu_[i + 1]);
    };

    bool next_full = VEC && l_beg + CHUNK <= l_end;  // ru, rd, rz hold a whole chunk
    if (next_full) issue(l_beg);
    float uu[TS], zz[TS];  // u and z of this lane's 8 steps of the current chunk

    for (int t0 = l_beg, k = 0; t0 < l_end; t0 += CHUNK, ++k) {
        const int buf = k & 1;
        __syncwarp();  // every lane of the warp is done reading the last chunk's sX
        const int rem = l_end - t0 - my;  // this lane's steps in the segment (see fetch)
        const int t1 = t0 + CHUNK;
        {
            float rr[TS];
            fetch(t0, next_full, uu, rr, zz);
            next_full = VEC && t1 + CHUNK <= l_end;
            if (next_full) issue(t1);
#pragma unroll
            for (int i = 0; i < TS; i += 2) scalar_pair(i, t0, uu, rr, sX[warp]);
        }
        const int tp = t1 + CHUNK;  // the chunk after next into L2
        if (tp < l_end) {
            prefetch_l2(u_l + tp);
            prefetch_l2(dt_l + tp);
            if (!LOCAL && HAS_Z) prefetch_l2(z_l + tp);
        }
        if (STORE_CKPT && (t0 % CKS) == 0 && valid) {
#pragma unroll
            for (int j = 0; j < QS; ++j) {
                const int n = q * QS + j;
                if (n < N) ckpt[(((long)b * n_ck + t0 / CKS) * N + n) * D + d] = h[j];
            }
        }
        __syncwarp();                           // sX complete (written by this warp)
        mbar_wait(&sBar[buf], (k >> 1) & 1);    // sBC[buf] complete

        // 2. the chunk's 32 steps for this lane's 4 states, in groups of GS steps, software-
        // pipelined: group g+1's shared-memory loads and GS x 4 exp2 (which do not depend on
        // the state) are issued before group g's state updates, so that their latencies
        // overlap the update chain
        const float4* sb = sBC[buf][0];
        const float4* sc = sBC[buf][CI];
        float4* yrow = &sY[warp][(q * CW + c) * YROW];
        float xg[GS], dA[GS][QS];
        float4 bq[GS], cq[GS];
        auto load_group = [&](int tg, float (&xg_)[GS], float (&dA_)[GS][QS], float4 (&bq_)[GS],
                              float4 (&cq_)[GS]) {
            float dlg[GS];
#pragma unroll
            for (int p = 0; p < GS / 2; ++p) {
                const float4 pr = sX[warp][(GS * tg) / 2 + p][c];
                dlg[2 * p] = pr.x;
                dlg[2 * p + 1] = pr.z;
                xg_[2 * p] = pr.y;
                xg_[2 * p + 1] = pr.w;
            }
#pragma unroll
            for (int sg = 0; sg < GS; ++sg) {
                bq_[sg] = sb[(GS * tg + sg) * QG + q];  // BC16: B and C packed
                if (!LOCAL && !BC16) cq_[sg] = sc[(GS * tg + sg) * QG + q];
#pragma unroll
                for (int j = 0; j < QS; ++j) dA_[sg][j] = ex2(dlg[sg] * A2[j]);
            }
        };
        load_group(0, xg, dA, bq, cq);
#pragma unroll
        for (int tg = 0; tg < CHUNK / GS; ++tg) {
            float nxg[GS], ndA[GS][QS];
            float4 nbq[GS], ncq[GS];
            if (tg + 1 < CHUNK / GS) load_group(tg + 1, nxg, ndA, nbq, ncq);
            float yp[GS];
#pragma unroll
            for (int sg = 0; sg < GS; ++sg) {
                float bj[QS] = {bq[sg].x, bq[sg].y, bq[sg].z, bq[sg].w};
                float4 cj = cq[sg];
                if (BC16) {  // each word: B (low half) and C (high half) in bf16
                    const unsigned w[QS] = {__float_as_uint(bq[sg].x), __float_as_uint(bq[sg].y),
                                            __float_as_uint(bq[sg].z), __float_as_uint(bq[sg].w)};
#pragma unroll
                    for (int j = 0; j < QS; ++j) bj[j] = Elem<1>::f((u16)(w[j] & 0xffffu));
                    cj = make_float4(Elem<1>::f((u16)(w[0] >> 16)), Elem<1>::f((u16)(w[1] >> 16)),
                                     Elem<1>::f((u16)(w[2] >> 16)), Elem<1>::f((u16)(w[3] >> 16)));
                }
#pragma unroll
                for (int j = 0; j < QS; ++j) h[j] = fmaf(dA[sg][j], h[j], xg[sg] * bj[j]);
                if (!LOCAL)
                    yp[sg] = fmaf(cj.x, h[0], fmaf(cj.y, h[1], fmaf(cj.z, h[2], cj.w * h[3])));
            }
            if (!LOCAL) {
#pragma unroll
                for (int i = 0; i < GS / 4; ++i)
                    yrow[(GS * tg) / 4 + i] = make_float4(yp[4 * i], yp[4 * i + 1], yp[4 * i + 2],
                                                          yp[4 * i + 3]);
            }
            if (tg + 1 < CHUNK / GS) {
#pragma unroll
                for (int sg = 0; sg < GS; ++sg) {
                    xg[sg] = nxg[sg];
                    bq[sg] = nbq[sg];
                    cq[sg] = ncq[sg];
#pragma unroll
                    for (int j = 0; j < QS; ++j) dA[sg][j] = ndA[sg][j];
                }
            }
        }

        // this thread is done with sBC[buf]: stage the next chunk's rows in the other buffer
        if (t1 < l_end) {
            sBC[buf ^ 1][0][tid] = nb;
            if (!LOCAL && !BC16) sBC[buf ^ 1][CI][tid] = nc;
            mbar_arrive(&sBar[buf ^ 1]);
            if (t1 + CHUNK < l_end) load_bc(t1 + CHUNK, nb, nc);
        }

        // 3. y of this lane's 8 steps summed over the channel's 4 lanes, then D and the gate
        if (!LOCAL) {
            __syncwarp();
            float y[TS];
#pragma unroll
            for (int i = 0; i < TS; ++i) y[i] = HAS_D ? D_v * uu[i] : 0.f;
#pragma unroll
            for (int qq = 0; qq < QG; ++qq) {
                const float4* src = &sY[warp][(qq * CW + c) * YROW + (my >> 2)];
                const float4 a = src[0], e = src[1];
                y[0] += a.x; y[1] += a.y; y[2] += a.z; y[3] += a.w;
                y[4] += e.x; y[5] += e.y; y[6] += e.z; y[7] += e.w;
            }
            if (HAS_Z) {
#pragma unroll
                for (int i = 0; i < TS; ++i) y[i] *= zz[i] * sigmoid(zz[i]);
            }
            if (valid && rem > 0) store_ts<DT, VEC>(out + row + t0 + my, rem, y);
        }
    }

    if (valid) {
#pragma unroll
        for (int j = 0; j < QS; ++j) {
            const int n = q * QS + j;
            if (STORE_LAST && n < N) last[(bs * D + d) * N + n] = h[j];
        }
    }
    if (LOCAL) {
        dsum_acc += __shfl_xor_sync(FULL, dsum_acc, 8);
        dsum_acc += __shfl_xor_sync(FULL, dsum_acc, 16);
        if (valid && q == 0) dsum[bs * D + d] = dsum_acc;
    }
}

// Pass 1 of the segment-parallel backward (KERNEL_NOTES v8, v10), the forward's layout walking
// time backwards: for time segment blockIdx.z = [l_beg, l_end), the adjoint at l_beg from a
// zero seed past l_end,
//   s_t = exp(delta_{t+1} A) s_{t+1} + C_t dy_t   (t = l_end-1 .. l_beg; dy = dout, times
//                                                 z sigmoid(z) with a gate),
// and sum_{l_beg < t <= l_end} delta_t (delta_L = 0), so that the true adjoint at l_beg is
// local + exp(A dsum) seed. Lane q of a channel computes delta and dy of its 8 steps of a chunk
// once (shared memory, as in ssm_fwd); C rows are staged per block. local: (B, S, D, N).
template <int DT, bool HAS_Z, bool HAS_BIAS, bool SOFTPLUS, bool VEC>
__global__ void __launch_bounds__(FW * 32, MINB) ssm_adj_local(
    const typename Elem<DT>::T* __restrict__ dt, const typename Elem<DT>::T* __restrict__ z,
    const typename Elem<DT>::T* __restrict__ dout,
    const float* __restrict__ A,       // (D, N)
    const float* __restrict__ Crows,   // (B, G, L, NP) fp32
    const float* __restrict__ bias,    // (D,)
    float* __restrict__ local,         // (B, S, D, N)
    float* __restrict__ dsum,          // (B, S, D)
    int L, int D, int N, int G, int Dg, int n_blk_g, int seg_len) {
    __shared__ float4 sC[2][CHUNK * NP / 4];      // [buf][step * 4 + q]
    __shared__ float4 sX[FW][CHUNK / 2][CW];      // (delta, dy) of two steps per channel
    __shared__ unsigned long long sBar[2];        // sC[buf] written by all 128 threads

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int q = lane >> 3, c = lane & 7;
    const int blk = blockIdx.x, b = blockIdx.y, seg = blockIdx.z, S = gridDim.z;
    const int g = blk / n_blk_g;
    const int c_in_g = (blk % n_blk_g) * FCH + warp * CW + c;
    const bool valid = c_in_g < Dg;
    const int d = g * Dg + (valid ? c_in_g : 0);
    const long row = ((long)b * D + d) * L;
    const long bs = (long)b * S + seg;
    const int l_beg = seg * seg_len;
    const int l_end = min(L, l_beg + seg_len);

    float A2[QS], s[QS];
#pragma unroll
    for (int j = 0; j < QS; ++j) {
        const int n = q * QS + j;
        A2[j] = n < N ? A[(long)d * N + n] * LOG2E : 0.f;
        s[j] = 0.f;
    }
    const float bias_v = HAS_BIAS ? bias[d] : 0.f;
    auto delta_at = [&](int t) {  // delta of one step, 0 past the sequence
        if (t >= L) return 0.f;
        const float r = Elem<DT>::f(dt[row + t]) + bias_v;
        return SOFTPLUS ? softplus(r) : r;
    };
    float dsum_acc = 0.f;  // this lane's steps of [l_beg, l_end)

    const long bc_base = ((long)b * G + g) * L * NP;
    auto load_c = [&](int t0) {
        const int t = t0 + (tid >> 2);
        return t < l_end ? reinterpret_cast<const float4*>(Crows + bc_base + (long)t * NP)[tid & 3]
                         : make_float4(0.f, 0.f, 0.f, 0.f);
    };
    const int my = q * TS;
    const int n_chunks = (l_end - l_beg + CHUNK - 1) / CHUNK;
    int t0 = l_beg + (n_chunks - 1) * CHUNK;  // chunks from the last
    // C rows staged through two mbarriers as in ssm_fwd (KERNEL_NOTES v10c)
    if (tid == 0) {
        mbar_init(&sBar[0], FW * 32);
        mbar_init(&sBar[1], FW * 32);
    }
    __syncthreads();
    float4 nc = load_c(t0);
    sC[0][tid] = nc;
    mbar_arrive(&sBar[0]);
    if (t0 - CHUNK >= l_beg) nc = load_c(t0 - CHUNK);
    Raw<DT> rd, rg, rz;
    bool next_full = VEC && t0 + CHUNK <= l_end;
    if (next_full) {
        rd = raw_load<DT>(dt + row + t0 + my);
        rg = raw_load<DT>(dout + row + t0 + my);
        if (HAS_Z) rz = raw_load<DT>(z + row + t0 + my);
    }
    float dn = 0.f;  // delta of the step after the current one (the later chunk's first)

    for (int k = 0; t0 >= l_beg; t0 -= CHUNK, ++k) {
        const int buf = k & 1;
        __syncwarp();  // every lane of the warp is done reading the last chunk's sX
        const int rem = l_end - t0 - my;  // unclamped, see store_ts
        float rr[TS], gg[TS], zz[TS];
        if (next_full) {
            raw_unpack<DT>(rd, rr);
            raw_unpack<DT>(rg, gg);
            if (HAS_Z) raw_unpack<DT>(rz, zz);
        } else {
            // dt past the end reads as -inf (softplus: delta = 0), dout as 0 (dy = 0)
            load_ts<DT>(dt + row + t0 + my, rem, rr, dt_fill<SOFTPLUS>());
            load_ts<DT>(dout + row + t0 + my, rem, gg);
            if (HAS_Z) load_ts<DT>(z + row + t0 + my, rem, zz);
        }
        const int t1 = t0 - CHUNK;  // the chunk before (whole: only the last can be partial)
        if (t1 >= l_beg) {
            next_full = VEC;
            if (next_full) {
                rd = raw_load<DT>(dt + row + t1 + my);
                rg = raw_load<DT>(dout + row + t1 + my);
                if (HAS_Z) rz = raw_load<DT>(z + row + t1 + my);
            }
            if (t1 - CHUNK >= l_beg) {
                prefetch_l2(dt + row + t1 - CHUNK + my);
                prefetch_l2(dout + row + t1 - CHUNK + my);
                if (HAS_Z) prefetch_l2(z + row + t1 - CHUNK + my);
            }
        }

        // 1. delta and dy of this lane's 8 steps (0 past the segment's end)
        float dl[TS], dy[TS];
#pragma unroll
        for (int i = 0; i < TS; ++i) {
            const float r = rr[i] + bias_v;
            dl[i] = SOFTPLUS ? softplus(r) : r * (i < rem ? 1.f : 0.f);
            dsum_acc += dl[i];
            dy[i] = HAS_Z ? gg[i] * zz[i] * sigmoid(zz[i]) : gg[i];
        }
#pragma unroll
        for (int i = 0; i < TS; i += 2)
            sX[warp][(my + i) >> 1][c] = make_float4(dl[i], dy[i], dl[i + 1], dy[i + 1]);
        __syncwarp();                           // sX complete (written by this warp)
        mbar_wait(&sBar[buf], (k >> 1) & 1);    // sC[buf] complete

        // 2. the chunk's 32 steps backwards, in groups of 4, pipelined as in ssm_fwd: group
        // g-1's loads and exp2 (of the deltas one step later) before group g's updates
        const float4* sc = sC[buf];
        float dy4[4], dA[4][QS];
        float4 cq[4];
        auto load_group = [&](int tg, float d_after, float (&dy4_)[4], float (&dA_)[4][QS],
                              float4 (&cq_)[4], float& d_first) {
            const float4 p0 = sX[warp][2 * tg][c], p1 = sX[warp][2 * tg + 1][c];
            const float dnx[4] = {p0.z, p1.x, p1.z, d_after};  // delta_{t+1} of the 4 steps
            dy4_[0] = p0.y; dy4_[1] = p0.w; dy4_[2] = p1.y; dy4_[3] = p1.w;
            d_first = p0.x;
#pragma unroll
            for (int s4 = 0; s4 < 4; ++s4) {
                cq_[s4] = sc[(4 * tg + s4) * QG + q];
#pragma unroll
                for (int j = 0; j < QS; ++j) dA_[s4][j] = ex2(dnx[s4] * A2[j]);
            }
        };
        float dfirst;
        load_group(CHUNK / 4 - 1, dn, dy4, dA, cq, dfirst);
#pragma unroll
        for (int tg = CHUNK / 4 - 1; tg >= 0; --tg) {
            float ndy4[4], ndA[4][QS], nfirst = 0.f;
            float4 ncq[4];
            if (tg > 0) load_group(tg - 1, dfirst, ndy4, ndA, ncq, nfirst);
#pragma unroll
            for (int s4 = 3; s4 >= 0; --s4) {
                const float cj[QS] = {cq[s4].x, cq[s4].y, cq[s4].z, cq[s4].w};
#pragma unroll
                for (int j = 0; j < QS; ++j) s[j] = fmaf(dA[s4][j], s[j], dy4[s4] * cj[j]);
            }
            if (tg > 0) {
#pragma unroll
                for (int s4 = 0; s4 < 4; ++s4) {
                    dy4[s4] = ndy4[s4];
                    cq[s4] = ncq[s4];
#pragma unroll
                    for (int j = 0; j < QS; ++j) dA[s4][j] = ndA[s4][j];
                }
            } else {
                dn = dfirst;  // the chunk's first delta: delta_{t+1} of the chunk before's last step
            }
            if (tg > 0) dfirst = nfirst;
        }
        // this thread is done with sC[buf]: stage the chunk before's rows in the other buffer
        if (t1 >= l_beg) {
            sC[buf ^ 1][tid] = nc;
            mbar_arrive(&sBar[buf ^ 1]);
            if (t1 - CHUNK >= l_beg) nc = load_c(t1 - CHUNK);
        }
    }

    if (valid) {
#pragma unroll
        for (int j = 0; j < QS; ++j) {
            const int n = q * QS + j;
            if (n < N) local[(bs * D + d) * N + n] = s[j];
        }
    }
    // sum over (l_beg, l_end] = sum over [l_beg, l_end) - delta_{l_beg} + delta_{l_end}
    dsum_acc += __shfl_xor_sync(FULL, dsum_acc, 8);
    dsum_acc += __shfl_xor_sync(FULL, dsum_acc, 16);
    if (valid && q == 0) dsum[bs * D + d] = dsum_acc - delta_at(l_beg) + delta_at(l_end);
}
