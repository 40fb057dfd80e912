"""Base models and model files: Stable Diffusion presets and loading, tiny models built in code,
the face encoder, CLIP, the user cache of converted models.
"""
