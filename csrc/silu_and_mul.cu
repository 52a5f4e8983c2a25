// Placeholder until the silu_and_mul family lands.
