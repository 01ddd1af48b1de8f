// The API's Entra ID application, declared with the Microsoft Graph Bicep extension (infra/bicepconfig.json), when
// the API takes Entra ID tokens (apiEntraAuth). Its app roles say who may do what, and assignment is required: only
// a user, group or service principal assigned a role can get a token for the API at all; the app then checks, on
// every route, that the token's roles allow it (shared/api_roles.py). The person running azd needs the right to
// create app registrations (by default every member of a tenant has it; else Entra's Application Developer role).
extension microsoftGraphV1

@description('Immutable unique name of the app registration (it keys the registration across deployments).')
param uniqueName string
param displayName string

// The roles' values are what the app checks; their ids are derived from them, so every deployment keeps them.
var roles = [
  {
    value: 'Exports.Admin'
    displayName: 'Exports admin'
    description: 'Change export definitions and connections; everything an operator may do.'
  }
  {
    value: 'Exports.Operator'
    displayName: 'Exports operator'
    description: 'Start, cancel and replay runs; read exports and runs.'
  }
  {
    value: 'Exports.Reader'
    displayName: 'Exports reader'
    description: 'Read exports and runs.'
  }
]
var identifierUri = 'api://${uniqueName}'

resource api 'Microsoft.Graph/applications@v1.0' = {
  uniqueName: uniqueName
  displayName: displayName
  signInAudience: 'AzureADMyOrg'
  identifierUris: [
    identifierUri
  ]
  api: {
    requestedAccessTokenVersion: 2
  }
  appRoles: [
    for role in roles: {
      id: guid(uniqueName, role.value)
      value: role.value
      displayName: role.displayName
      description: role.description
      // People, and scripts signed in as service principals (client credentials).
      allowedMemberTypes: [
        'User'
        'Application'
      ]
      isEnabled: true
    }
  ]
}

resource apiPrincipal 'Microsoft.Graph/servicePrincipals@v1.0' = {
  appId: api.appId
  appRoleAssignmentRequired: true
}

output clientId string = api.appId
output identifierUri string = identifierUri
output servicePrincipalId string = apiPrincipal.id
