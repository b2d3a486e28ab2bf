"""Video synthesis (MISSION section 4): next-frame model G, its losses and training, key frames,
synthetic videos from stills and key-frame label propagation."""
