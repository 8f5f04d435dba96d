/* sum2.glsl — compensated sums of products in f32 (Ogita, Rump & Oishi's Dot2): a vec2 (s, c)
   holds s plus the rounding errors c of every product (fma) and every addition (TwoSum), so
   sum2_get is as accurate as a sum accumulated in twice f32's precision, then rounded once,
   without shaderFloat64. `precise` keeps drivers from fusing or re-associating the error terms
   away (Mesa folds (a + b) - a to b otherwise). ~8 flops per term instead of 1. */
void sum2_add(inout vec2 a, float x, float y) {
    precise float p = x * y;
    precise float pe = fma(x, y, -p); /* x·y - p exactly */
    precise float s = a.x + p;
    precise float z = s - a.x;
    precise float e = (a.x - (s - z)) + (p - z); /* a.x + p - s exactly */
    a = vec2(s, a.y + (e + pe));
}
float sum2_get(vec2 a) { return a.x + a.y; }
