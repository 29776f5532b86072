package agent

import (
	"testing"

	"github.com/bulkhead-edge/bulkhead/lab"
)

// The binaries the tests build (lab.Binary) are removed when they end.
func TestMain(m *testing.M) { lab.Main(m) }
