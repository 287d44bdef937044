"""What the claims rest on: the cost model by primitive (cost, on hardware profiles from
hardware), speed against the roofline and transformers (bench), Mamba against a transformer
on this machine (compare; report and plots draw the results), what a model selects (selection),
and the Mamba paper's synthetic tasks (tasks)."""
