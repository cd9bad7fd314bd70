"""Triton kernels for the losses that dominate large-batch training, each with its PyTorch reference."""

from fused_losses.contrastive import all_gather_with_grad, contrastive_loss, contrastive_loss_reference
from fused_losses.sigmoid import sigmoid_loss, sigmoid_loss_reference
from fused_losses.structure import (gram_structure_loss, gram_structure_loss_reference, structure_loss,
                               structure_loss_reference)

__all__ = ["all_gather_with_grad", "contrastive_loss", "contrastive_loss_reference", "sigmoid_loss",
           "sigmoid_loss_reference", "structure_loss", "structure_loss_reference", "gram_structure_loss",
           "gram_structure_loss_reference"]
