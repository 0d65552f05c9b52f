import logging

# Under "bentoml." so that BentoML's logging set-up shows it beside the server's own lines.
log = logging.getLogger("bentoml.vision_foundry")
