#!/usr/bin/env bash
# Install the optional scorers that cannot be ordinary dependencies of cdmbench.
#
# image-reward 1.5 pins timm==0.6.13 (open_clip needs timm >= 1.0) and pulls old sdists, so it goes in
# without its dependencies; everything it needs for scoring (torch, torchvision, timm, transformers,
# huggingface_hub) is already a cdmbench dependency, plus fairscale. The fixes it needs under
# transformers 5 live in cdmbench/eval/metrics/_imagereward_compat.py.
#
# Weights are not downloaded here. Offline, point cdmbench at local files:
#   ImageReward: CDMBENCH_IMAGEREWARD_PATH=.../ImageReward.pt, CDMBENCH_IMAGEREWARD_MED_CONFIG=.../med_config.json
#                (hub repo THUDM/ImageReward), CDMBENCH_BERT_TOKENIZER_PATH=<bert-base-uncased folder or vocab.txt>
#   HPS v2.1:    CDMBENCH_HPS_PATH=.../HPS_v2.1_compressed.pt (hub repo xswu/HPSv2)
#   CLIP score:  CDMBENCH_CLIP_MODEL=ViT-L-14-quickgelu CDMBENCH_CLIP_PRETRAINED=<local OpenAI ViT-L/14 open_clip checkpoint>
#   FID:         CDMBENCH_INCEPTION_PATH=.../inception-2015-12-05.pt, CDMBENCH_FID_REF=<image folder or mu/sigma .npz>
#
# Usage: scripts/install_scorers.sh            (uses `python` on PATH; override with PYTHON=...)
set -euo pipefail
PYTHON="${PYTHON:-python}"

"$PYTHON" -m pip install --no-deps "image-reward==1.5" "fairscale==0.4.13"
HF_HUB_OFFLINE=1 "$PYTHON" -c "from cdmbench.eval.metrics._imagereward_compat import import_imagereward; import_imagereward(); print('image-reward: importable')"
