// Placeholder until the rotary family lands.
