"""A cluster: many nodes behind stateless API replicas, one PostgreSQL (docs/architecture.md)."""
