"""Helpers shared by the test suites' conftests: tiny ONNX models built in code, and real service processes."""
