package bench

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strings"
	"text/tabwriter"
)

// Better says which way a figure improves.
type Better string

// The two directions.
const (
	Lower  Better = "lower"  // times, memory
	Higher Better = "higher" // rates
)

// Figure is one measured value against its baseline, measured in the same
// run: the ratio is what is compared across runs and machines, since
// absolute figures on a shared machine drift and ratios much less.
type Figure struct {
	Name          string  `json:"figure"`         // what Value is, with its unit: "p50_ms", "creates_per_sec"
	Value         float64 `json:"value"`          // hearth's figure
	Baseline      string  `json:"baseline"`       // what it is measured against: "bare_qemu_p50_ms"
	BaselineValue float64 `json:"baseline_value"` // the baseline's figure, same unit
	Ratio         float64 `json:"ratio"`          // Value / BaselineValue
	Better        Better  `json:"better"`         // which way the ratio improves
	Target        float64 `json:"target,omitempty"`
	Met           *bool   `json:"met,omitempty"` // against Target; absent without a target
}

// NewFigure computes the ratio and, with a target, whether it is met.
func NewFigure(name string, value float64, baseline string, baselineValue float64, better Better, target float64) Figure {
	f := Figure{Name: name, Value: value, Baseline: baseline, BaselineValue: baselineValue, Better: better, Target: target}
	if baselineValue != 0 {
		f.Ratio = round(value/baselineValue, 3)
	}
	if target != 0 {
		met := f.Ratio <= target
		if better == Higher {
			met = f.Ratio >= target
		}
		f.Met = &met
	}
	return f
}

// Result is the one JSON line every benchmark ends with: "bench", "n", its
// main figure inline ("figure", "value", "baseline", "baseline_value",
// "ratio", ...), the other figures under "more", and the benchmark's own
// figures under "details" (snake_case keys).
type Result struct {
	Bench string `json:"bench"`
	N     int    `json:"n"`
	Smoke bool   `json:"smoke,omitempty"`
	Figure
	More    []Figure `json:"more,omitempty"`
	Details any      `json:"details,omitempty"`
	// Error is set by `hearth-bench all` for a benchmark that failed.
	Error string `json:"error,omitempty"`
}

// Figures are the main figure and the others.
func (r *Result) Figures() []Figure { return append([]Figure{r.Figure}, r.More...) }

// JSON renders r as one line.
func (r *Result) JSON() string {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Sprintf(`{"bench":%q,"error":%q}`, r.Bench, err.Error())
	}
	return string(b)
}

// Check is what a smoke run asserts of a result: it names its benchmark,
// it ran something, and every figure has a finite, positive ratio.
func (r *Result) Check() error {
	if r.Error != "" {
		return fmt.Errorf("%s: %s", r.Bench, r.Error)
	}
	if r.Bench == "" || r.N <= 0 {
		return fmt.Errorf("result %q: bench and n must be set (n=%d)", r.Bench, r.N)
	}
	var errs []error
	for _, f := range r.Figures() {
		if f.Name == "" || f.Baseline == "" || !(f.Ratio > 0) || math.IsInf(f.Ratio, 0) || !(f.Value > 0) || !(f.BaselineValue > 0) {
			errs = append(errs, fmt.Errorf("%s: figure %q against %q: value %v, baseline %v, ratio %v: want all positive",
				r.Bench, f.Name, f.Baseline, f.Value, f.BaselineValue, f.Ratio))
		}
	}
	return errors.Join(errs...)
}

// ReadResults reads a file of JSON lines written by `hearth-bench all
// --out`, or any benchmark's output: lines that are not JSON objects with
// a "bench" key (the progress lines) are skipped.
func ReadResults(path string) ([]Result, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ParseResults(f)
}

// ParseResults is ReadResults over a reader.
func ParseResults(r io.Reader) ([]Result, error) {
	var out []Result
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var res Result
		if err := json.Unmarshal([]byte(line), &res); err != nil || res.Bench == "" {
			continue
		}
		out = append(out, res)
	}
	return out, sc.Err()
}

// Compare writes the figures of two runs side by side: each figure's
// ratio in A and in B, and B's ratio over A's ("change": below 1 is
// better for a figure whose ratio should be lower, above 1 for one that
// should be higher). Figures found in one run only are listed too.
func Compare(w io.Writer, a, b []Result) error {
	type key struct{ bench, figure, baseline string }
	type row struct{ a, b *Figure }
	rows := map[key]*row{}
	var order []key
	add := func(rs []Result, side int) {
		for _, r := range rs {
			for _, f := range r.Figures() {
				k := key{r.Bench, f.Name, f.Baseline}
				if rows[k] == nil {
					rows[k] = &row{}
					order = append(order, k)
				}
				if side == 0 {
					rows[k].a = &f
				} else {
					rows[k].b = &f
				}
			}
		}
	}
	add(a, 0)
	add(b, 1)
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "BENCH\tFIGURE\tBASELINE\tA RATIO\tB RATIO\tB/A\tVERDICT")
	cell := func(f *Figure) string {
		if f == nil {
			return "-"
		}
		return fmt.Sprintf("%.3f", f.Ratio)
	}
	for _, k := range order {
		r := rows[k]
		change, verdict := "-", ""
		if r.a != nil && r.b != nil && r.a.Ratio > 0 {
			c := r.b.Ratio / r.a.Ratio
			change = fmt.Sprintf("%.3f", c)
			verdict = verdictOf(c, r.b.Better)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.bench, k.figure, k.baseline, cell(r.a), cell(r.b), change, verdict)
	}
	return tw.Flush()
}

// verdictOf names a change of ratio beyond 5% (this machine's noise).
func verdictOf(change float64, better Better) string {
	switch {
	case change > 1.05 && better == Higher, change < 0.95 && better == Lower:
		return "better"
	case change > 1.05, change < 0.95:
		return "worse"
	}
	return "same"
}
