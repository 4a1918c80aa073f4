"""Pure functions of decomposed diffusion, one per equation of ``method.md``."""
from videofusion_jax.diffusion.decomposition import (
    combine_noise,
    compose_noise,
    decomposed_eps,
    decomposed_noise,
    frame_lambdas,
    frame_residuals,
    insert_key_frame,
    key_frame_index,
    non_key_frames,
    predict_x0,
    q_sample,
    remove_base_noise,
    take_frames,
)
from videofusion_jax.diffusion.guidance import (
    anchor_weights,
    anchored_eps,
    classifier_free_guidance,
    guided_decomposed_eps,
    guided_eps,
)
from videofusion_jax.diffusion.losses import (
    denoising_loss,
    joint_loss,
    min_snr_weights,
    sample_residual_frames,
    sample_timesteps,
    video_denoising_loss,
)
from videofusion_jax.diffusion.samplers import (
    ddim_step,
    ddim_timesteps,
    ddpm_step,
    decomposed_eps_fn,
    row_noise,
    sample,
    sample_chain,
    sample_embeddings,
)
from videofusion_jax.diffusion.schedules import SCHEDULE_KINDS, Schedule, make_schedule

__all__ = [
    "SCHEDULE_KINDS", "Schedule", "anchor_weights", "anchored_eps",
    "classifier_free_guidance", "combine_noise", "compose_noise",
    "ddim_step", "ddim_timesteps", "ddpm_step", "decomposed_eps", "decomposed_eps_fn", "decomposed_noise",
    "denoising_loss",
    "frame_lambdas", "frame_residuals", "guided_decomposed_eps", "guided_eps", "insert_key_frame", "joint_loss",
    "key_frame_index", "make_schedule",
    "min_snr_weights", "non_key_frames", "predict_x0", "q_sample", "remove_base_noise", "row_noise",
    "sample", "sample_chain", "sample_embeddings", "sample_residual_frames", "sample_timesteps",
    "take_frames", "video_denoising_loss",
]
