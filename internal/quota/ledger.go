package quota

import (
	"encoding/json"
	"time"

	corev1 "k8s.io/api/core/v1"
	quotav1 "k8s.io/apiserver/pkg/quota/v1"
)

// The ledger of recent charges, kept on the quota (annotation Charges) by
// admission: what it charged, by second, for the last ChargeGrace. A
// create is charged before its object is stored, and the controller's
// cache sees the object later still; so the controller counts used as
// what the objects add up to plus what was charged within the grace. That
// may count a new object twice for a few seconds, never not at all: used
// reads high for a moment after a burst, and a delete is credited at once.
const (
	Charges     = "hearth.dev/charges"
	ChargeGrace = 5 * time.Second
)

// Charge is what was charged within one second.
type Charge struct {
	At   time.Time           `json:"at"`
	Used corev1.ResourceList `json:"used"`
}

// ParseLedger reads a quota's ledger (nothing, if it cannot be read).
func ParseLedger(annotations map[string]string) []Charge {
	var l []Charge
	_ = json.Unmarshal([]byte(annotations[Charges]), &l)
	return l
}

// Record adds delta (its positive part: what goes back is not a charge)
// to the ledger at now, dropping what is older than the grace, and
// returns the annotation's value.
func Record(l []Charge, now time.Time, delta corev1.ResourceList) string {
	sec := now.UTC().Truncate(time.Second)
	var kept []Charge
	for _, c := range l {
		if fresh(c, now) {
			kept = append(kept, c)
		}
	}
	if len(kept) == 0 || !kept[len(kept)-1].At.Equal(sec) {
		kept = append(kept, Charge{At: sec, Used: corev1.ResourceList{}})
	}
	last := kept[len(kept)-1].Used
	for n, q := range delta {
		if q.Sign() > 0 {
			sum := last[canonical(n)]
			sum.Add(q)
			last[canonical(n)] = sum
		}
	}
	b, _ := json.Marshal(kept)
	return string(b)
}

// Recent is what the ledger charged within the grace before now, and when
// the oldest of it leaves the grace (zero if nothing is recent).
func Recent(l []Charge, now time.Time) (corev1.ResourceList, time.Time) {
	sum := corev1.ResourceList{}
	var until time.Time
	for _, c := range l {
		// A bucket holds charges of its whole second: it stays until
		// the grace has passed for the last of them.
		end := c.At.Add(time.Second + ChargeGrace)
		if !fresh(c, now) {
			continue
		}
		sum = quotav1.Add(sum, c.Used)
		if until.IsZero() || end.Before(until) {
			until = end
		}
	}
	return sum, until
}

// fresh says whether a bucket is still within the grace at now. One from
// the future (a clock set back, an annotation written by hand) is not: it
// would hold used up for as long as the clock is behind.
func fresh(c Charge, now time.Time) bool {
	return now.Before(c.At.Add(time.Second+ChargeGrace)) && !c.At.After(now.Add(time.Second))
}
