"""erp-broker: a credential-broker sidecar for IFS Applications 10, IFS PSO and Infor ION."""

__version__ = "0.1.0"
