"""OpenTelemetry export (Apitally 1.x, or any OTLP/HTTP collector)."""
