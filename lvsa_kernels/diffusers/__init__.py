"""diffusers integration: one call turns the self-attention of a diffusers video transformer (18 families: Wan,
HunyuanVideo, CogVideoX, LTX, Mochi, Cosmos, Kandinsky, ...) into LVSA block-sparse attention (model table:
``docs/models.md``).

    from lvsa_kernels.diffusers import enable_lvsa, disable_lvsa
    handle = enable_lvsa(pipe)            # or enable_lvsa(pipe.transformer, key_frame_interval=4, ...)
    video = pipe(prompt, num_frames=321).frames[0]
    disable_lvsa(pipe)                    # original processors back

    handle = enable_svoo(pipe, top_p=0.9)  # SVOO: enable_lvsa(pipe, pattern=SVOOPattern(...))
"""
from .integration import SUPPORTED_MODELS, LVSAHandle, disable_lvsa, enable_lvsa, enable_svoo
from .state import StepTracker

__all__ = ["enable_lvsa", "enable_svoo", "disable_lvsa", "LVSAHandle", "StepTracker", "SUPPORTED_MODELS"]
