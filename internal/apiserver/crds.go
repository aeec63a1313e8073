package apiserver

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	extv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	extclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"hearth.dev/hearth/api/v1alpha1"
)

// InstallCRDs creates or updates hearth's CRDs and waits until they are
// established, so that the server reports ready only once it serves them.
func InstallCRDs(ctx context.Context, cfg *rest.Config, log *slog.Logger) error {
	client, err := extclient.NewForConfig(cfg)
	if err != nil {
		return err
	}
	docs, err := v1alpha1.CRDs()
	if err != nil {
		return err
	}
	for _, doc := range docs {
		var want extv1.CustomResourceDefinition
		if err := yaml.UnmarshalStrict(doc, &want); err != nil {
			return fmt.Errorf("decode CRD: %w", err)
		}
		crds := client.ApiextensionsV1().CustomResourceDefinitions()
		err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
			got, err := crds.Get(ctx, want.Name, metav1.GetOptions{})
			switch {
			case apierrors.IsNotFound(err):
				_, err = crds.Create(ctx, &want, metav1.CreateOptions{})
			case err == nil:
				want.ResourceVersion = got.ResourceVersion
				_, err = crds.Update(ctx, &want, metav1.UpdateOptions{})
			}
			if err != nil {
				log.Debug("install CRD", "name", want.Name, "err", err)
				return false, nil
			}
			return true, nil
		})
		if err != nil {
			return fmt.Errorf("install CRD %s: %w", want.Name, err)
		}
		err = wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
			got, err := crds.Get(ctx, want.Name, metav1.GetOptions{})
			if err != nil {
				return false, nil
			}
			for _, c := range got.Status.Conditions {
				if c.Type == extv1.Established && c.Status == extv1.ConditionTrue {
					return true, nil
				}
			}
			return false, nil
		})
		if err != nil {
			return fmt.Errorf("CRD %s never became established: %w", want.Name, err)
		}
	}
	return nil
}
