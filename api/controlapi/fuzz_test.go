package controlapi

import (
	"bytes"
	"io"
	"net/http"
	"testing"

	"github.com/go-json-experiment/json"
)

// FuzzSyncResponse: what a device reads from control as a sync answer
// either decodes or is an error (never a panic), and what decodes survives
// a round trip unchanged.
func FuzzSyncResponse(f *testing.F) {
	f.Add(200, []byte(`{"server_time":"2026-11-29T00:00:00Z","cursor":3,"commands":["AA=="],"bundle":"AA=="}`))
	f.Add(403, []byte(`{"error":"device dev-1 is not enrolled here"}`))
	f.Add(200, []byte(`{"roots":[null,"AA=="]}`))
	f.Fuzz(func(t *testing.T, code int, body []byte) {
		if code < 100 || code > 599 {
			return
		}
		var got SyncResponse
		err := ReadResponse(&http.Response{StatusCode: code, Status: http.StatusText(code), Body: io.NopCloser(bytes.NewReader(body))}, &got)
		if err != nil || code/100 != 2 {
			return
		}
		raw, err := json.Marshal(got)
		if err != nil {
			t.Fatalf("re-encoding %+v: %v", got, err)
		}
		var again SyncResponse
		if err := json.Unmarshal(raw, &again); err != nil {
			t.Fatalf("decoding what it encoded: %v", err)
		}
		if raw2, _ := json.Marshal(again); !bytes.Equal(raw, raw2) {
			t.Fatalf("round trip: %s became %s", raw, raw2)
		}
	})
}
