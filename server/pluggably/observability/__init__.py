"""What the gateway tells its operator: structured logs, Prometheus metrics, OpenTelemetry traces."""
