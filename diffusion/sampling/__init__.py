"""Sampling: the noise schedule (`schedule`), the samplers' steps (`samplers`), guidance terms
(`guidance`), the loop that applies them in one fixed order (`loop`), and whole sampling plans
(`plan`) whose images `images` writes."""
