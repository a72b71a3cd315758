"""``lava explore``: a local web app to look at MM-DiT attention maps (Gradio, an optional extra).

``session`` holds the logic (UI values → lava calls, the per-session cache of captured maps,
error messages) and imports no Gradio; ``render`` draws heatmaps and grids and writes the
downloads; ``app`` is the Gradio layout and the server. See docs/explore.md.
"""
