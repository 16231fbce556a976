"""The control plane: one folder per service, each with a thin ``__main__`` that wires
and logic modules testable without a process. Services are stateless; durable state
lives in JetStream KV, and replicas share request subjects through queue groups."""
