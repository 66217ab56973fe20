"""DirectNoiseModel: the one-step baseline of NoiseSequenceRNN_v3, x_T (+ text) -> x'_n in one forward.

It is the RNN's exact architecture and parameter count (the same `NoiseSequenceRNNConfig`, CNN encoder, FiLM
U-Net decoder and change head), run for a single step: its GRU sees one input from a zero state, so it acts as a
gated feed-forward layer and nothing recurs. Trained on the pairs (x_T, x'_n) of the same stage-2 sequences, it
predicts the whole change x'_n - x_T (`delta_scale` is that change's RMS), where the RNN predicts n steps of it
with the intermediate targets x'_1 .. x'_{n-1}. Comparing the two isolates what the sequence adds.
"""
from __future__ import annotations

import torch

from .rnn_seq_model_v3 import NoiseSequenceRNN_v3, NoiseSequenceRNNConfig


class DirectNoiseModel(NoiseSequenceRNN_v3):
    """NoiseSequenceRNN_v3's network predicting x'_n from x_T in one step (no recurrence); exported like it (its
    config document's model_type: DirectNoiseModel)."""

    model_type = "DirectNoiseModel"
    config_class = NoiseSequenceRNNConfig
    one_step = True  # predicts x'_n directly: the trainer and the rollout treat it as one step

    def forward(self, x_T: torch.Tensor, text: torch.Tensor):
        """x_T (B, C, H, W), text (B, P) -> (mean (B, C, H, W), logvar (B, C, H, W) or None) predicting x'_n."""
        mean, logvar = super().forward(x_T[:, None], text)  # (B, 1, C, H, W)
        return mean[:, 0], (logvar[:, 0] if logvar is not None else None)

    @torch.no_grad()
    def generate_sequence(self, x_T: torch.Tensor, text: torch.Tensor, n: int | None = None, sample: bool = False,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """x_T (B, C, H, W), text (B, P) -> (B, 1, C, H, W): the predicted x'_n (the mean, or with `sample=True` a draw
        from the predicted Gaussian). `n` is accepted for the rollout interface; the model has one output step."""
        was_training = self.training
        self.eval()
        try:
            mean, logvar = self(x_T, text)
            if sample and logvar is not None:
                where = generator.device if generator is not None else mean.device
                noise = torch.randn(mean.shape, generator=generator, device=where).to(mean.device, mean.dtype)
                mean = mean + torch.exp(0.5 * logvar.to(mean.dtype)) * noise
            return mean[:, None]
        finally:
            self.train(was_training)
