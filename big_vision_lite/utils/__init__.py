"""Small helpers every layer may use: atomic files, dtype names, cache paths and compile-aware timing."""
