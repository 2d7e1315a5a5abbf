"""Decoding: samplers and the on-device generation loop over a fixed-size cache."""
