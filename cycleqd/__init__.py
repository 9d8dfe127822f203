"""cycleqd: CycleQD (Kuroki et al., ICLR 2025, arXiv 2410.14735) — quality-diversity
search over model weights that evolves multi-skill models from single-skill experts."""

__version__ = "0.1.0"
