package gpsd

import "testing"

// Reports as gpsd 3.22 writes them: only a TPV with a 2D or 3D fix and a
// position is one.
func TestParse(t *testing.T) {
	for _, tc := range []struct {
		line string
		ok   bool
		lat  float64
	}{
		{`{"class":"VERSION","release":"3.22","rev":"3.22","proto_major":3,"proto_minor":14}`, false, 0},
		{`{"class":"TPV","device":"/dev/pts/3","mode":1}`, false, 0},
		{`{"class":"TPV","device":"/dev/pts/3","mode":3,"time":"2026-11-24T15:00:01.000Z","lat":41.525000000,"lon":-88.081700000,"alt":180.0}`, true, 41.525},
		{`{"class":"TPV","device":"/dev/pts/3","mode":2,"lat":41.53,"lon":-88.08}`, true, 41.53},
		{`{"class":"TPV","mode":3,"lon":-88.08}`, false, 0},
		{`{"class":"TPV","mode":3,"lat":91.0,"lon":-88.08}`, false, 0},
		{`{"class":"SKY","satellites":[]}`, false, 0},
		{`{"class":"TPV","mode":3,"lat":`, false, 0},
	} {
		p, ok := parse([]byte(tc.line))
		if ok != tc.ok || ok && p.Lat != tc.lat {
			t.Errorf("parse(%s) = %+v, %v", tc.line, p, ok)
		}
	}
}
