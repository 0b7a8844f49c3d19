"""Torch side: TF-exact fake-quant numerics, quantizers, QAT modules and graph preparation."""
