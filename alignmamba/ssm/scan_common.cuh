// Helpers shared by the selective scan's CUDA kernels (scan_fwd.cu, scan_bwd.cu): fast-math
// exp2/log2/rcp, softplus and sigmoid, element types of the (B, D, L) streams, and loads and
// stores of TS consecutive steps of one row. nvrtc.py pastes this file where a kernel source
// includes this header by name (NVRTC then needs no include path).
#pragma once

#define TS 8  // steps per vector load/store of one row (16 bytes of bf16/fp16, 32 of fp32)
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define FULL 0xffffffffu

typedef unsigned short u16;

// ftz: without it every exp2 gets a denormal range check and two scaling multiplies (ncu,
// KERNEL_NOTES v9); results below 2^-126 become 0, an absolute change < 1.2e-38
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// pull the 128-byte line at p into L2 (no register, no wait)
__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
}
__device__ __forceinline__ float lg2(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float rcp(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// max(x, 0) + log1p(exp(-|x|)), log1p by its series where 1 + e would round e away. Both
// branches are computed and one selected: a branch here (what nvcc makes of the ternary) costs
// the forward a predicate wait per step (ncu, KERNEL_NOTES v10)
__device__ __forceinline__ float softplus(float x) {
    const float e = ex2(-fabsf(x) * LOG2E);
    const float series = e * (1.f - 0.5f * e);
    const float lg = lg2(1.f + e) * LN2;
    return fmaxf(x, 0.f) + (e < 1e-4f ? series : lg);
}
__device__ __forceinline__ float sigmoid(float x) { return rcp(1.f + ex2(-x * LOG2E)); }
// what dt reads as past the end of a segment: with softplus, -inf gives delta = 0 exactly (no
// per-step mask); without, 0 (the caller masks delta)
template <bool SOFTPLUS>
__device__ __forceinline__ float dt_fill() { return SOFTPLUS ? __int_as_float(0xff800000) : 0.f; }

// element types of the (B, D, L) streams: 0 fp32, 1 bf16, 2 fp16 (round to nearest even)
template <int DT> struct Elem;
template <> struct Elem<0> {
    typedef float T;
    __device__ static float f(T x) { return x; }
    __device__ static T t(float x) { return x; }
};
template <> struct Elem<1> {
    typedef u16 T;
    __device__ static float f(T x) { return __uint_as_float(((unsigned)x) << 16); }
    __device__ static T t(float x) {
        u16 r;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
        return r;
    }
};
template <> struct Elem<2> {
    typedef u16 T;
    __device__ static float f(T x) {
        float y;
        asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(x));
        return y;
    }
    __device__ static T t(float x) {
        u16 r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
        return r;
    }
};

// TS steps of one row as raw 16-byte words (fp32 takes two), for loads issued together and
// unpacked later: one memory round trip per sub-chunk instead of one per stream (KERNEL_NOTES v9)
template <int DT> struct Raw { uint4 w[DT == 0 ? 2 : 1]; };

template <int DT>
__device__ __forceinline__ Raw<DT> raw_load(const typename Elem<DT>::T* p) {
    Raw<DT> r;
    const uint4* q = reinterpret_cast<const uint4*>(p);
    r.w[0] = q[0];
    if constexpr (DT == 0) r.w[1] = q[1];
    return r;
}

template <int DT>
__device__ __forceinline__ void raw_unpack(const Raw<DT>& r, float (&out)[TS]) {
    if constexpr (DT == 0) {
        const unsigned w[8] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w,
                               r.w[1].x, r.w[1].y, r.w[1].z, r.w[1].w};
#pragma unroll
        for (int i = 0; i < TS; ++i) out[i] = __uint_as_float(w[i]);
    } else {
        const unsigned w[4] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            out[2 * i] = Elem<DT>::f((u16)(w[i] & 0xffffu));
            out[2 * i + 1] = Elem<DT>::f((u16)(w[i] >> 16));
        }
    }
}

// TS consecutive steps of one row starting at p, nv of them valid (the rest read as fill), one
// element at a time: rows that are not 16-byte aligned, and the sequence's partial last
// sub-chunk (whole aligned sub-chunks go through raw_load / raw_unpack)
template <int DT>
__device__ __forceinline__ void load_ts(const typename Elem<DT>::T* p, int nv, float (&out)[TS],
                                        float fill = 0.f) {
#pragma unroll
    for (int i = 0; i < TS; ++i) out[i] = i < nv ? Elem<DT>::f(p[i]) : fill;
}

// TS consecutive steps of one row starting at p, the first nv of them (nv may be <= 0 or exceed
// TS) stored: one 16-byte store when all TS are valid and VEC, else one element at a time.
// Callers pass the unclamped count: nv = max(0, min(TS, x)) followed by nv == TS compiled to a
// VIMNMX whose predicate output chose the wrong path (KERNEL_NOTES v11, v10c).
template <int DT, bool VEC>
__device__ __forceinline__ void store_ts(typename Elem<DT>::T* p, int nv, const float (&v)[TS]) {
    if (VEC && nv >= TS) {
        if constexpr (DT == 0) {
            asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" :: "l"(p), "f"(v[0]), "f"(v[1]),
                         "f"(v[2]), "f"(v[3]) : "memory");
            asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" :: "l"(p + 4), "f"(v[4]),
                         "f"(v[5]), "f"(v[6]), "f"(v[7]) : "memory");
        } else {
            // explicit 16-byte store: a uint4 assignment compiled to four 4-byte stores
            unsigned w[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                w[i] = (unsigned)Elem<DT>::t(v[2 * i]) | ((unsigned)Elem<DT>::t(v[2 * i + 1]) << 16);
            asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" :: "l"(p), "r"(w[0]), "r"(w[1]),
                         "r"(w[2]), "r"(w[3]) : "memory");
        }
    } else {
#pragma unroll
        for (int i = 0; i < TS; ++i)
            if (i < nv) p[i] = Elem<DT>::t(v[i]);
    }
}

// mbarrier in shared memory (sm_80+): a block-wide "all have written" signal that does not make
// the arriving threads wait (ssm_fwd stages the next chunk's B/C rows with it, KERNEL_NOTES v10c)
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared.b64 [%0], %1;" :: "r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
    unsigned long long state;
    asm volatile("mbarrier.arrive.shared.b64 %0, [%1];" : "=l"(state) : "r"(smem_u32(bar)) : "memory");
}
// until the phase of `parity` (0, 1, 0, ... for the barrier's successive phases) has completed
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
    asm volatile(
        "{\n\t.reg .pred done;\n"
        "MBAR_WAIT:\n\t"
#if __CUDA_ARCH__ >= 900
        "mbarrier.try_wait.parity.shared.b64 done, [%0], %1;\n\t"
#else
        "mbarrier.test_wait.parity.shared.b64 done, [%0], %1;\n\t"
#endif
        "@!done bra MBAR_WAIT;\n}" :: "r"(smem_u32(bar)), "r"(parity) : "memory");
}
