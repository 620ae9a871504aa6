"""Ids, token strings and normalisation constants that released READ checkpoints depend on.

Pure Python (no torch) so that data code and tools can import it cheaply.
"""

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
SEG_TOKEN = "[SEG]"

# CLIP ViT-L/14-336: 24 x 24 patches.
CLIP_IMAGE_SIZE = 336
CLIP_PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (CLIP_IMAGE_SIZE // CLIP_PATCH_SIZE) ** 2  # 576
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# SAM
SAM_IMAGE_SIZE = 1024
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
MASK_IGNORE_VALUE = 255
