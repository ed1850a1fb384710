"""Run by tests/test_multinode.py under `accelerate launch`: build the train stage's vision cache with every launched
process (`open_or_build_together`) from the params file given as the argument."""

import logging
import sys

from accelerate import Accelerator

from florence_ops.config import load_params
from florence_ops.data.processed import ImageTable
from florence_ops.modeling import load_pretrained
from florence_ops.vision.stage_cache import open_or_build_together

logging.basicConfig(level=logging.INFO)
params = load_params(sys.argv[1])
accelerator = Accelerator(cpu=True)
model, processor = load_pretrained(params.paths.base_model, params.model)
images = ImageTable(params.paths.processed)
open_or_build_together(params, model.model.vision_tower.eval(), processor.image_processor, images, accelerator)
accelerator.end_training()
