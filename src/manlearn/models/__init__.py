"""Backbones only: they know nothing of local learning."""
from .base import Backbone, follows_protocol
from .registry import create_model, list_models, register_model
from . import resnet_cifar  # noqa: F401  (registers the CIFAR ResNets)
from .resnet_cifar import init_weights

__all__ = ["Backbone", "follows_protocol", "create_model", "list_models", "register_model", "init_weights"]
