"""Embedded reasoning recipes (TOML): `frugalm r1` starts from r1.toml."""
