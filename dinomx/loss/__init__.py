from dinomx.loss.dino_clstoken_loss import DINOLoss

__all__ = ["DINOLoss"]
