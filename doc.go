// Package bulkhead is the repository root. It holds no agent code, only
// repository-wide checks (every package documents what it owns). See
// README.md and docs/ for the design.
package bulkhead
