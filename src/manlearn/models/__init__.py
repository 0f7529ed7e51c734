"""Backbones only: they know nothing of local learning."""
from .base import Backbone, follows_protocol
from .registry import create_model, list_models, model_accepts, model_tags, register_model
from . import resnet_cifar, resnet, vgg, vit  # noqa: F401  (register the CIFAR/ImageNet ResNets, the VGGs, the ViTs)
from .resnet_cifar import init_weights
from .adapters import adapt_model, cut_model
from .pretrained import load_pretrained

__all__ = ["Backbone", "follows_protocol", "create_model", "list_models", "model_accepts", "model_tags",
           "register_model", "init_weights", "adapt_model", "cut_model", "load_pretrained"]
