#!/bin/sh
# azd runs this after `azd deploy` on Linux and macOS (azure.yaml hooks; postdeploy.ps1 is the Windows twin): it
# subscribes the app's Event Grid trigger to the export account's model.json writes (infra/app/events.bicep). The
# subscription names the function, which exists only once the code is deployed: that is why this is not part of
# `azd provision`. azd passes its environment values (EXPORT_STORAGE_ACCOUNT_ID, and main.bicep's outputs). Run it
# again with `azd hooks run postdeploy`.
set -eu

if [ -z "${EXPORT_STORAGE_ACCOUNT_ID:-}" ]; then
  echo "EXPORT_STORAGE_ACCOUNT_ID is not set: no Event Grid subscription; runs start on the timer (EXPORT_SCHEDULE)."
  exit 0
fi
if ! command -v az >/dev/null 2>&1; then
  echo "The Azure CLI (az) is needed to subscribe the app to the export account's events, and is not installed:" >&2
  echo "install it (https://aka.ms/installazurecli), run 'az login --tenant $AZURE_TENANT_ID', then 'azd hooks run postdeploy'." >&2
  exit 1
fi
signed_in=$(az account show --query tenantId -o tsv 2>/dev/null || true)
if [ -z "$signed_in" ]; then
  echo "The Azure CLI is not signed in: run 'az login --tenant $AZURE_TENANT_ID', then 'azd hooks run postdeploy'." >&2
  exit 1
fi
if [ "$signed_in" != "$AZURE_TENANT_ID" ]; then
  echo "The Azure CLI is signed in to tenant $signed_in, azd deployed to $AZURE_TENANT_ID: run" >&2
  echo "'az login --tenant $AZURE_TENANT_ID', then 'azd hooks run postdeploy'." >&2
  exit 1
fi

subscription=$(echo "$EXPORT_STORAGE_ACCOUNT_ID" | cut -d/ -f3)
account_group=$(echo "$EXPORT_STORAGE_ACCOUNT_ID" | cut -d/ -f5)
account=$(echo "$EXPORT_STORAGE_ACCOUNT_ID" | cut -d/ -f9)
# An account has at most one system topic, in any group of its subscription: use it as it is, where it is. Resource
# ids compare without case (Azure writes group names in either case).
topics=$(az eventgrid system-topic list --subscription "$subscription" --query "[].[id, source]" -o tsv)
topic_id=$(echo "$topics" | awk -v wanted="$EXPORT_STORAGE_ACCOUNT_ID" 'tolower($2) == tolower(wanted) { print $1; exit }')
if [ -n "$topic_id" ]; then
  topic=$(echo "$topic_id" | cut -d/ -f9)
  group=$(echo "$topic_id" | cut -d/ -f5)
  create=false
else
  topic="$account-events"
  group=$account_group
  create=true
fi
echo "Subscribing $AZURE_FUNCTION_NAME to model.json writes in $account (Event Grid system topic $topic in $group)"
# A fresh app may not answer Event Grid's validation yet (its keys listed, its host cold): try again a few times.
attempt=1
until az deployment group create --subscription "$subscription" --resource-group "$group" \
  --name "$AZURE_FUNCTION_NAME-events" --template-file infra/app/events.bicep --output none \
  --parameters exportStorageAccountId="$EXPORT_STORAGE_ACCOUNT_ID" topicName="$topic" createTopic="$create" \
    functionAppName="$AZURE_FUNCTION_NAME" functionAppResourceGroup="$AZURE_RESOURCE_GROUP" \
    functionAppSubscriptionId="$AZURE_SUBSCRIPTION_ID"; do
  if [ "$attempt" -ge "${EVENTS_DEPLOY_ATTEMPTS:-5}" ]; then
    echo "The Event Grid subscription failed $attempt times: see the error above, then 'azd hooks run postdeploy'." >&2
    exit 1
  fi
  wait=$((attempt * ${EVENTS_RETRY_SECONDS:-30}))
  echo "The Event Grid subscription failed (attempt $attempt); trying again in $wait s." >&2
  sleep "$wait"
  attempt=$((attempt + 1))
done
