"""mimdex.encoders."""
