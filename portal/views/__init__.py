"""The portal's areas, one Flask blueprint each."""
