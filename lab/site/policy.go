package site

import (
	"fmt"
	"strings"
)

// policyJSON is the site's policy, as security operations would write
// it: five segments (a tier-1 carrier and a rate-limited tier-3 broker
// among them) and three classes, each with what its context may take
// away. With shift, the scanners' WMS access holds only in that window
// (UTC, every day).
func (s *Site) policyJSON(shift *[2]string) string {
	gw := map[string]string{}
	for _, seg := range s.Segments {
		gw[seg.Name] = fmt.Sprintf(`"gateway": {"public_key": %q, "endpoint": %q}`, seg.Key, seg.Endpoint)
	}
	scannerWMS, schedules := `{"segment": "wms", "ports": ["443"]}`, ""
	if shift != nil {
		scannerWMS = `{"segment": "wms", "ports": ["443"], "schedule": "shift"}`
		schedules = fmt.Sprintf(`
  "schedules": {"shift": {"zone": "UTC", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": %q, "end": %q}},`, shift[0], shift[1])
	}
	return strings.TrimSpace(fmt.Sprintf(`
{
  "schema": "bulkhead.policy/v1",
  "control": [{"address": %q, "port": %d}, {"address": %q, "port": %d}, {"address": %q, "port": %d}],
  "validity": {"max_offline": "72h"},
  "segments": [
    {"name": "wms", "data_class": "operational", "tier": 0,
     "destinations": [{"cidr": "10.20.1.0/24", "protocol": "tcp", "ports": ["443"]}],
     %s},
    {"name": "finance", "data_class": "financial", "tier": 0,
     "destinations": [{"cidr": "10.30.0.0/24", "protocol": "tcp", "ports": ["443"]}],
     %s},
    {"name": "carrier-edi", "data_class": "commercial", "tier": 1, "partner": "northline-freight",
     "destinations": [{"cidr": "10.60.0.0/24", "protocol": "tcp", "ports": ["443"]}],
     %s},
    {"name": "broker-portal", "data_class": "commercial", "tier": 3, "partner": "spotload-brokers",
     "destinations": [{"cidr": "10.70.0.10/32", "protocol": "tcp", "ports": ["443", "%d"]}],
     "rate_limit": {"bytes_per_second": 125000, "burst_bytes": 125000},
     %s},
    {"name": "diagnostics", "data_class": "operational", "tier": 0,
     "destinations": [{"cidr": "10.50.0.0/28", "protocol": "tcp", "ports": ["22"]}],
     %s}
  ],
  "tier_limits": {"3": {"bytes_per_second": 250000, "burst_bytes": 250000}},%s
  "classes": {
    "dock-gateway": {
      "rules": [{"segment": "wms"}, {"segment": "finance"}, {"segment": "carrier-edi"},
                {"segment": "broker-portal"}, {"segment": "diagnostics"}],
      "profiles": {"restricted": ["wms"], "offline": ["wms"], "diagnostic": ["diagnostics"]},
      "checks": [{"id": "edr-running", "process": {"name": %q}}]
    },
    "scanner": {
      "rules": [%s, {"segment": "diagnostics"}],
      "profiles": {"restricted": ["wms"], "diagnostic": ["diagnostics"]}
    },
    "telematics": {
      "rules": [{"segment": "carrier-edi"}, {"segment": "diagnostics"}],
      "profiles": {"restricted": ["diagnostics"], "offline": ["carrier-edi"], "diagnostic": ["diagnostics"]},
      "checks": [{"id": "service-area", "geofence": {"circle": {"lat": %v, "lon": %v, "radius_m": 500}}}]
    },
    %q: {"rules": []}
  }
}`, controlAddr.Addr(), controlAddr.Port(), replicaAddr[0].Addr(), replicaAddr[0].Port(), replicaAddr[1].Addr(), replicaAddr[1].Port(), gw["wms"], gw["finance"], gw["carrier-edi"], brokerFeed, gw["broker-portal"], gw["diagnostics"],
		schedules, s.SensorName, scannerWMS, yard.Lat, yard.Lon, gatewayClass))
}
