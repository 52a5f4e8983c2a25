// Placeholder until the attention family lands.
