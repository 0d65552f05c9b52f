from dinomx.loss.centering import TeacherCentering
from dinomx.loss.dino_clstoken_loss import DINOLoss
from dinomx.loss.distillation_loss import RelationalDistillationLoss
from dinomx.loss.ibot_patch_loss import IBOTPatchLoss
from dinomx.loss.koleo_loss import KoLeoLoss

__all__ = ["DINOLoss", "IBOTPatchLoss", "KoLeoLoss", "RelationalDistillationLoss", "TeacherCentering"]
