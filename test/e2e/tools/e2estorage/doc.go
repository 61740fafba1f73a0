// Package e2estorage builds a smaller e2e.test for the external storage
// tier: see e2e_test.go. It has no code of its own outside the test binary.
package e2estorage
