"""The paper's published numbers, in one place: the figures, the report, the tables and the CLI read them here.

Zhang, Khan & Papyan, Attention Sinks: A "Catch, Tag, Release" Mechanism for Embeddings (NeurIPS 2025), and the
authors' rebuttal for the sentiment probes.
"""

#: threshold sweep on an 8B model: eps -> (mean sinks per head, mean VE over all heads)
SWEEP_8B = {0.03: (5.3, 0.45), 0.2: (1.07, 0.32), 0.4: (0.81, 0.27)}

#: tag-probe accuracies (paper Table 1; sentiment from the rebuttal), for side-by-side tables
PROBES = {
    "truth": "cities true/false, Qwen2.5 3B/7B/14B, Llama-3 8B, Llama-3.1 8B: tag probe 92.5%-99.5%, non-tag near "
             "chance on the selected heads, tag can beat full; Qwen3 8B / 14B: tag probe 100% / 87%",
    "sentiment": "SST-2 style sentences (rebuttal): tag probe 86.5%-94.0%",
}

#: tag geometry: distinct tags mostly have |cosine| within this band ...
TAG_COSINE_BAND = 0.05
#: ... and a tag against the token it is added to lies in this cosine range
TAG_TOKEN_COSINE_RANGE = (-0.17, 0.02)

#: the minimal averaging task: (variant, heads, initial tag value) -> seeds that learn it
TOY = {
    ("single", 1, 1.0): "0/10",
    ("single", 1, 6.0): "3/10",
    ("single", 1, 10.0): "4/10",
    ("two-sink", 2, 10.0): "converges",
    ("two-sink", 1, 10.0): "0/15",
}
