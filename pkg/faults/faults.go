//go:build !faults

// Package faults marks the steps of multi-step operations where the
// fault-injection tests (make test-faults) kill the driver. In normal
// builds Point does nothing; a binary built with the "faults" tag kills
// itself with SIGKILL at the point named by SPOOL_FAULT_POINT.
package faults

// Point marks a step between two durable changes.
func Point(string) {}
