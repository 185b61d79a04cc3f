"""Tests for dropkey.py, vit.py, train_cifar.py and theory.ipynb.

Statistical tests use fixed seeds and state their tolerance: a realised rate
over n Bernoulli(d) draws must lie within 4 sigma = 4 sqrt(d (1 - d) / n).
"""
import math

import pytest
import torch

import dropkey
from vit import ViT

# ============================================================================ core: dropkey.py, vit.py

# ============================================================================ exact expectation

# ============================================================================ trainer: train_cifar.py

# ============================================================================ notebook: theory.ipynb
