// The exact eq. 7 path's heavy reductions (model/exact.py), float32, one thread per
// output element (eq7_row_max: one per step). Compiled at run time by
// torch.mps.compile_shader; kernels/metal/__init__.py calls them and
// kernels/reference.py holds their numpy twins (same names).
//
// Arguments bind in call order: tensors are contiguous float32 (mask: uint8) buffers,
// Python ints arrive as 64-bit `long`. Every kernel checks its bound, so a grid wider
// than the output is harmless.

#include <metal_stdlib>
using namespace metal;

// out[r] = sqrt(sum_i g[r, i]^2): |grad_{h_j} L_i| for each (step, position) row r of
// a (rows, d) gradient.
kernel void grad_norm(device float* out [[buffer(0)]],
                      device const float* g [[buffer(1)]],
                      constant long& rows [[buffer(2)]],
                      constant long& d [[buffer(3)]],
                      uint r [[thread_position_in_grid]]) {
    if ((long)r >= rows) return;
    device const float* x = g + (long)r * d;
    float acc = 0.0f;
    for (long i = 0; i < d; ++i) {
        acc += x[i] * x[i];
    }
    out[r] = sqrt(acc);
}

// Tracker-layout attention rows: out[k, t] = sum_lh w[lh] * p[lh, k, t], where lh runs
// over the tracked layers x heads, p is (lh, k, t) and out is (k, t) flattened to kt.
kernel void weighted_rows(device float* out [[buffer(0)]],
                          device const float* p [[buffer(1)]],
                          device const float* w [[buffer(2)]],
                          constant long& lh [[buffer(3)]],
                          constant long& kt [[buffer(4)]],
                          uint i [[thread_position_in_grid]]) {
    if ((long)i >= kt) return;
    float acc = 0.0f;
    for (long j = 0; j < lh; ++j) {
        acc += w[j] * p[j * kt + i];
    }
    out[i] = acc;
}

// The same rows weighted by value norms: out[k, t] = sum_lh w[lh] * p[lh, k, t] * v[lh, t]
// with v (lh, t) the norm of each head's value vector at position t.
kernel void weighted_value_rows(device float* out [[buffer(0)]],
                                device const float* p [[buffer(1)]],
                                device const float* w [[buffer(2)]],
                                device const float* v [[buffer(3)]],
                                constant long& lh [[buffer(4)]],
                                constant long& k [[buffer(5)]],
                                constant long& t [[buffer(6)]],
                                uint i [[thread_position_in_grid]]) {
    long kt = k * t;
    if ((long)i >= kt) return;
    long col = (long)i % t;
    float acc = 0.0f;
    for (long j = 0; j < lh; ++j) {
        acc += w[j] * p[j * kt + i] * v[j * t + col];
    }
    out[i] = acc;
}

// Eq. 7 (w * g * H) per step, its maximum over the step's candidate positions, floored
// at 0 (a step whose maximum is not positive normalizes to all zeros). One thread per step.
kernel void eq7_row_max(device float* row_max [[buffer(0)]],
                        device const float* w [[buffer(1)]],
                        device const float* g [[buffer(2)]],
                        device const float* h [[buffer(3)]],
                        device const uchar* mask [[buffer(4)]],
                        constant long& s [[buffer(5)]],
                        constant long& t [[buffer(6)]],
                        uint r [[thread_position_in_grid]]) {
    if ((long)r >= s) return;
    float m = 0.0f;
    for (long j = (long)r * t; j < ((long)r + 1) * t; ++j) {
        if (mask[j]) {
            m = max(m, w[j] * g[j] * h[r]);
        }
    }
    row_max[r] = m;
}

// out[r, j] = (w * g * H)[r, j] / row_max[r] on candidates, 0 elsewhere and on steps
// whose maximum is 0 (paper eq. 7, normalized per step to [0, 1]).
kernel void eq7_normalize(device float* out [[buffer(0)]],
                          device const float* w [[buffer(1)]],
                          device const float* g [[buffer(2)]],
                          device const float* h [[buffer(3)]],
                          device const uchar* mask [[buffer(4)]],
                          device const float* row_max [[buffer(5)]],
                          constant long& s [[buffer(6)]],
                          constant long& t [[buffer(7)]],
                          uint i [[thread_position_in_grid]]) {
    if ((long)i >= s * t) return;
    long r = (long)i / t;
    float m = row_max[r];
    out[i] = (mask[i] && m > 0.0f) ? w[i] * g[i] * h[r] / m : 0.0f;
}
