// Placeholder until the int4_gemm family lands.
