#version 450
#extension GL_GOOGLE_include_directive : require
/* ssm_conv.comp — causal depthwise conv of K taps + SiLU with its state (Gated DeltaNet):
   y[t][c] = silu(Σ_j w[c][j] · x[t - K + 1 + j][c]), inputs before the chunk from the state,
   which holds the last K - 1 inputs oldest first ([K-1][C]) and keeps them afterwards. One
   invocation per channel walks the n tokens in order.
   bindings: 0 x [n][C], 1 y [n][C], 2 w [C][K] (f32), 3 state (in place) */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) writeonly buffer Y { float y[]; };
layout(std430, binding = 2) readonly buffer W { float w[]; };
layout(std430, binding = 3) buffer St { float st[]; };
layout(push_constant) uniform PC { PC_SSM_CONV(PC_FIELD) } pc;

float conv_in(int s, uint c) { return s >= 0 ? x[uint(s) * pc.C + c] : st[uint(int(pc.K) - 1 + s) * pc.C + c]; }

void main() {
    uint c = wg_linear_x() * WG + gl_LocalInvocationIndex;
    if (c >= pc.C) return;
    int K = int(pc.K), n = int(pc.n);
    float wk[16], keep[16];
    for (int j = 0; j < K; j++) wk[j] = w[c * pc.K + uint(j)];
    for (int t = 0; t < n; t++) {
        float acc = 0.0;
        for (int j = 0; j < K; j++) acc += wk[j] * conv_in(t - (K - 1) + j, c);
        y[uint(t) * pc.C + c] = acc / (1.0 + exp(-acc));
    }
    for (int j = 0; j < K - 1; j++) keep[j] = conv_in(n - (K - 1) + j, c);
    for (int j = 0; j < K - 1; j++) st[uint(j) * pc.C + c] = keep[j];
}
