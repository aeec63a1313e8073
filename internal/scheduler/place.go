// Package scheduler binds pending Sandboxes to Hosts. Placement is a pure
// function from an immutable snapshot of the cluster to a decision
// (Snapshot.Place, with its filter and score plugins in plugins.go); the
// controller (controller.go) builds the snapshot from its cache, places the
// pending sandboxes oldest first and writes each binding through the
// sandbox's status subresource, the one path that sets status.hostName.
package scheduler

import (
	"fmt"
	"hash/fnv"
	"sort"
	"strings"

	"hearth.dev/hearth/api/v1alpha1"
)

// Decision is where a sandbox goes: Host, or "" and Reason, which says
// why no host fits, with counts per reason as kube-scheduler says it:
// "0/3 hosts are available: 2 insufficient memory, 1 didn't match the host
// selector."
type Decision struct {
	Host   string
	Reason string
	Score  int64
}

// minFeasible and the percentage below bound how many fitting hosts are
// scored: past that, a better host is rarely worth the time, as
// kube-scheduler's percentageOfNodesToScore reasons. Small clusters are
// always scored whole.
const minFeasible = 100

func feasibleWanted(n int) int {
	if n <= minFeasible {
		return n
	}
	pct := max(5, 50-n/125)
	return max(minFeasible, n*pct/100)
}

// Place decides where sb goes. It reads the snapshot and nothing else:
// hosts are examined from a starting point derived from the sandbox's
// name (so that concurrent decisions spread over a large cluster) until
// enough fit, and the best scoring of those wins, ties to the first name.
func (s *Snapshot) Place(sb *v1alpha1.Sandbox) Decision {
	n := len(s.Hosts)
	if n == 0 {
		return Decision{Reason: "no hosts are registered"}
	}
	q, err := s.query(sb)
	if err != nil {
		return Decision{Reason: err.Error()}
	}
	want := feasibleWanted(n)
	if s.Sample > 0 {
		want = min(s.Sample, n)
	}
	h := fnv.New32a()
	h.Write([]byte(sb.Namespace + "/" + sb.Name))
	start := int(h.Sum32() % uint32(n))
	var why map[string]int
	best, bestScore, found := -1, int64(0), 0
	for k := 0; k < n && found < want; k++ {
		i := (start + k) % n
		host := s.Hosts[i]
		if r := q.filter(i, host); r != "" {
			if why == nil {
				why = map[string]int{}
			}
			why[r]++
			continue
		}
		found++
		sc := q.score(i, host)
		if best < 0 || sc > bestScore || (sc == bestScore && host.Name < s.Hosts[best].Name) {
			best, bestScore = i, sc
		}
	}
	if best < 0 {
		return Decision{Reason: unschedulable(n, why)}
	}
	return Decision{Host: s.Hosts[best].Name, Score: bestScore}
}

// unschedulable says why no host fits, as the Kubernetes scheduler does:
// "0/3 hosts are available: 2 insufficient cpu, 1 not ready."
func unschedulable(n int, why map[string]int) string {
	parts := make([]string, 0, len(why))
	for w, c := range why {
		parts = append(parts, fmt.Sprintf("%d %s", c, w))
	}
	sort.Strings(parts)
	return fmt.Sprintf("0/%d hosts are available: %s.", n, strings.Join(parts, ", "))
}
