"""capfilt: CapFilt (BLIP §3.3, BLIP-2 §3.4) data curation for image-text pairs on Ray Data."""

__version__ = "0.1.0"
